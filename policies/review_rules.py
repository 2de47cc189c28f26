"""What the static review flags and why: the rule tables of ``policies.review``.

Each table maps a resolved dotted name (or, for receivers the review cannot resolve, an attribute
name) to a ``Category`` and the reason shown to the admin. ``policies.review`` walks the code and
applies them; this module holds only data, so a rule can be read, and reviewed, in one place.
"""

from __future__ import annotations

import re
from enum import StrEnum


class Category(StrEnum):
    """What a finding is about."""

    IMPORT = "import"  # a module outside ALLOWED_PACKAGES, a star or a relative import
    FILE = "file"  # reads, writes or probes the file system
    NETWORK = "network"  # opens connections
    PROCESS = "process"  # starts, forks, signals or replaces processes
    ENVIRONMENT = "environment"  # reads or changes environment variables
    DYNAMIC_CODE = "dynamic-code"  # runs code or reaches names the review cannot see
    DUNDER = "dunder"  # interpreter internals: the classic sandbox escapes


_ENVIRONMENT_WHY = "reads or changes environment variables, which on the server include its private key"
# (pattern, category, why). A pattern matches a resolved dotted name and everything below it
# ("os.exec*" matches os.execv and os.execv.__call__). The first matching rule wins.
RULES: tuple[tuple[str, Category, str], ...] = (
    *((name, Category.ENVIRONMENT, _ENVIRONMENT_WHY)
      for name in ("os.environ*", "os.getenv*", "os.putenv", "os.unsetenv")),
    *((name, Category.PROCESS, "starts, replaces or signals processes")
      for name in ("subprocess", "os.system", "os.popen", "os.exec*", "os.spawn*", "os.posix_spawn*", "os.fork*",
                   "os.kill*", "os._exit", "os.abort", "pty", "multiprocessing", "torch.multiprocessing", "signal",
                   "concurrent.futures.ProcessPoolExecutor", "asyncio.create_subprocess_*",
                   "torch.utils.cpp_extension")),
    *((name, Category.NETWORK, "opens network connections")
      for name in ("socket", "ssl", "urllib", "http", "requests", "httpx", "aiohttp", "websockets", "ftplib",
                   "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc", "asyncio.open_connection",
                   "asyncio.start_server", "torch.hub", "torch.utils.model_zoo", "torch.distributed")),
    ("builtins.open", Category.FILE, "opens files"),
    ("pathlib", Category.FILE, "reads and writes files"),
    ("os.path", Category.FILE, "probes the file system"),
    *((name, Category.FILE, "reads, writes or lists files")
      for name in ("os.open", "os.fdopen", "os.read", "os.write", "os.remove", "os.unlink", "os.rename*",
                   "os.replace", "os.mkdir", "os.makedirs", "os.rmdir", "os.removedirs", "os.listdir",
                   "os.scandir", "os.walk", "os.fwalk", "os.chmod", "os.chown", "os.lchown", "os.link",
                   "os.symlink", "os.readlink", "os.truncate", "os.stat", "os.lstat", "os.chdir", "os.getcwd",
                   "os.access", "os.utime", "os.mkfifo", "os.sendfile", "io.open", "io.FileIO", "codecs.open",
                   "shutil", "tempfile", "glob", "fileinput", "sqlite3", "torch.load", "torch.save",
                   "torch.serialization.load", "torch.serialization.save", "torch.from_file", "torch.jit.load",
                   "torch.jit.save", "numpy.load", "numpy.save*", "numpy.loadtxt", "numpy.genfromtxt",
                   "numpy.fromfile", "numpy.memmap")),
    *((name, Category.FILE, "writes the site's durable state (ledger, budgets, approvals, audit log)")
      for name in ("policies.durable", "policies.budget", "policies.ledger", "policies.audit", "policies.approvals")),
    *((name, Category.DYNAMIC_CODE, "bypasses the site runtime: submitted code calls policies.site_runtime only")
      for name in ("policies.dp", "policies.secagg", "policies.fingerprint", "policies.accounting")),
    *((name, Category.DYNAMIC_CODE, "runs or loads code the review cannot see")
      for name in ("builtins.exec", "builtins.eval", "builtins.compile", "builtins.__import__", "builtins.breakpoint",
                   "importlib", "runpy", "code", "codeop", "types.CodeType", "types.FunctionType", "ctypes", "cffi",
                   "torch.ops.load_library", "torch.classes.load_library", "torch.package", "numpy.ctypeslib",
                   "typing.get_type_hints", "typing.ForwardRef")),
    *((name, Category.DYNAMIC_CODE, "unpickling runs arbitrary code")
      for name in ("pickle.load*", "pickle.Unpickler", "_pickle", "marshal", "dill", "cloudpickle", "shelve",
                   "joblib.load", "pandas.read_pickle")),
    *((name, Category.DYNAMIC_CODE, "reads or rebinds names the review cannot follow")
      for name in ("builtins.globals", "builtins.locals", "builtins.vars", "builtins.setattr", "builtins.delattr",
                   "sys.modules", "sys._getframe", "inspect", "gc")),
)

# A module reached as an attribute of an allowed one (torch.serialization.os) is checked as itself.
REROOTED_MODULES = frozenset(
    {
        "os", "sys", "subprocess", "socket", "shutil", "pathlib", "builtins", "importlib", "ctypes", "pickle",
        "marshal", "dill", "pty", "multiprocessing", "urllib", "requests", "httpx", "tempfile", "inspect", "gc",
        "runpy", "shelve", "io",
    }
)

# Attribute names flagged on receivers the review cannot resolve (a parameter, a returned object).
ATTRIBUTE_HINTS: tuple[tuple[str, Category, str], ...] = (
    *((name, Category.ENVIRONMENT, "looks like environment access")
      for name in ("environ*", "getenv*", "putenv", "unsetenv")),
    *((name, Category.PROCESS, "looks like starting a process")
      for name in ("system", "popen", "execl*", "execv*", "spawn*", "posix_spawn*", "fork", "forkpty", "startfile")),
    *((name, Category.FILE, "looks like a file operation")
      for name in ("open", "read_text", "read_bytes", "write_text", "write_bytes", "unlink", "rmdir", "rmtree",
                   "mkdir", "touch", "iterdir", "rglob", "symlink_to", "hardlink_to", "save_pretrained",
                   "to_json_file")),
    *((name, Category.NETWORK, "looks like network access")
      for name in ("urlopen", "create_connection", "push_to_hub")),
    *((name, Category.DYNAMIC_CODE, "looks like loading a module") for name in ("exec_module", "load_module")),
)

# Dunder attributes that ordinary code uses (super().__init__()) and that lead nowhere new.
HARMLESS_DUNDERS = frozenset(
    {"__init__", "__name__", "__qualname__", "__doc__", "__len__", "__iter__", "__next__", "__getitem__",
     "__call__", "__enter__", "__exit__"}
)
# Frame, code and function internals: from a frame, f_globals and f_builtins reach everything.
INTROSPECTION_ATTRIBUTES = frozenset(
    {"f_globals", "f_locals", "f_builtins", "f_back", "f_code", "gi_frame", "gi_code", "cr_frame", "cr_code",
     "ag_frame", "tb_frame", "tb_next", "co_code", "co_consts", "func_globals"}
)
# Dunder names that, inside a string, feed getattr or str.format ("{0.__class__.__init__.__globals__}").
ESCAPE_DUNDERS = frozenset(
    {"__class__", "__base__", "__bases__", "__mro__", "__subclasses__", "__globals__", "__builtins__", "__code__",
     "__closure__", "__dict__", "__getattribute__", "__reduce__", "__reduce_ex__", "__import__", "__loader__",
     "__spec__", "__self__", "__func__"}
)
REMOTE_CODE_WHY = "trust_remote_code: runs Python files shipped with the model"
DUNDER_IN_TEXT = re.compile(r"__\w+?__")

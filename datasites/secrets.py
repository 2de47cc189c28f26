"""The site's secrets: the admin password (required, never defaulted, never weak) and the database URL.

PySyft ships a well-known root login (info@openmined.org / changethis). A Fedsite site never runs
with it: the admin password must come from ``$FEDSITE_ADMIN_PASSWORD`` or a secret file, and a weak
one is refused before the server starts.

A PostgreSQL URL carries the database password. On the command line, every account on the machine
reads it (``ps``, ``/proc/PID/cmdline``), so it comes from ``$FEDSITE_DB_URL`` or from a file only its
owner may read (``--db-url-file``), and a ``--db-url`` with a password in it is refused.
"""

from __future__ import annotations

import os
import stat
import string
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from datasites.errors import FedsiteError

PASSWORD_ENV = "FEDSITE_ADMIN_PASSWORD"
DB_URL_ENV = "FEDSITE_DB_URL"
MIN_LENGTH = 12
_COMMON = {"changethis", "password", "passw0rd", "letmein", "qwerty", "iloveyou", "openmined"}
GENERATE_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(18))'"


def read_secret(
    *, env: str, file: str | os.PathLike[str] | None, what: str, private_file: bool = False,
    hint: str = GENERATE_HINT,
) -> str:
    """A secret from a file (first line) if given, else from the environment variable; required.

    With ``private_file``, a file that the group or others may read or write (anything but 0600 or
    0400, give or take the owner's bits) is refused. ``hint`` ends the error for a missing secret.
    """
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FedsiteError(f"{what} file {path} does not exist: create it or set {env}")
        if private_file:
            check_private_file(path, what=f"{what} file")
        secret = path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
    else:
        secret = os.environ.get(env, "")
    if not secret:
        raise FedsiteError(f"no {what}: set {env} or pass a secret file; {hint}")
    return secret


def check_private_file(path: Path, *, what: str) -> None:
    """Refuse a file that other users may read or write; the error gives the chmod that fixes it."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FedsiteError(f"{what} {path} is mode {mode:04o}, open to other users: make it private with "
                           f"`chmod 600 {path}`")


def database_url(*, url: str | None, file: str | os.PathLike[str] | None) -> str | None:
    """The PostgreSQL URL a site keeps its store in (``None``: SQLite in the data dir).

    From ``file`` (``--db-url-file``, mode 0600 or 0400), else ``url`` (``--db-url``) if it holds no
    password (peer or .pgpass authentication), else ``$FEDSITE_DB_URL``, else ``None``.
    """
    if url is not None and file is not None:
        raise FedsiteError("--db-url and --db-url-file both name the database: pass one")
    if url is not None:
        if _has_password(url):
            raise FedsiteError(
                "--db-url contains a password, which every user of this machine can read in `ps` and "
                f"/proc: put the URL in a file only you can read and pass --db-url-file PATH (chmod 600), "
                f"or set ${DB_URL_ENV}"
            )
        return url
    if file is None and not os.environ.get(DB_URL_ENV):
        return None
    return read_secret(env=DB_URL_ENV, file=file, what="database URL", private_file=True,
                       hint="write postgresql://user:password@host:5432/db on its first line")


def _has_password(url: str) -> bool:
    """A password in the URL's user part or query (libpq reads ``?password=``), or any ``password=``."""
    try:
        parts = urlsplit(url)
        in_user = bool(parts.password)
        in_query = "password" in {key.lower() for key in parse_qs(parts.query)}
    except ValueError:  # malformed: judge by the text alone
        in_user = in_query = False
    return in_user or in_query or "password=" in url.lower()


def check_password_strength(password: str, *, what: str = "admin password") -> str:
    """Refuse short, common or single-class passwords; the error says how to make a good one."""
    lowered = password.lower()
    if len(password) < MIN_LENGTH:
        raise FedsiteError(f"{what} is too weak ({len(password)} characters, need {MIN_LENGTH}+): {GENERATE_HINT}")
    if any(word in lowered for word in _COMMON):
        raise FedsiteError(f"{what} is too weak (contains a common or default password): {GENERATE_HINT}")
    classes = [string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation]
    used = sum(any(ch in cls for ch in password) for cls in classes)
    if used < 3 and len(password) < 20:
        raise FedsiteError(
            f"{what} is too weak (uses {used} of: lower, upper, digits, symbols; need 3, or 20+ characters): "
            f"{GENERATE_HINT}"
        )
    return password


def admin_password(file: str | os.PathLike[str] | None = None) -> str:
    return check_password_strength(read_secret(env=PASSWORD_ENV, file=file, what="admin password"))

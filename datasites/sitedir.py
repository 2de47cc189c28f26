"""A datasite's data directory: its identity, its syft store, its budgets, and the lock on it.

Layout (format 2)::

    DIR/fedsite.json            format, site name, server UID, admin email, creation time
    DIR/secrets/signing_key     the syft server's private signing key (0600)
    DIR/secrets/identity_key    the site's Ed25519 identity key for the secure sum (0600); its public
                                half is what other admins pin in the federation roster
    DIR/secrets/journal_key     the MAC key of the site's journals (policies.durable)
    DIR/peers.json              the peers this site's admin pinned, and its minimum threshold (policies.peers)
    DIR/syft/db/                syft's SQLite store (unless --db-url points at PostgreSQL)
    DIR/syft/blob/              syft's blob store (objects > 1 MB)
    DIR/budgets.json            per-dataset privacy budgets (policies.budget)
    DIR/datasets/NAME.json      per-dataset facts the site's policies need (fingerprint, size)
    DIR/serve.lock              held (flock) by the one process serving this directory
    DIR/serve.json              where (host, port, http or https) that process listens, while it runs

and the site's journals and ledgers (ledger/, approvals.jsonl, audit.jsonl, runs/).

Everything here is the site owner's alone: the data dir and every folder in it are 0700, every file
0600. The store holds the private records, secrets/ the keys, the journals who ran what; a copy readable
by another account on the machine is a leak that no review or privacy budget can see. Each start checks
(``SiteDir.tighten_modes``) and tightens what is looser, and a site process creates files under umask
0o077.

syft 0.9.5 gives a server a random identity unless one is supplied, and a restart with another
key on the same database crashes (docs/syft.md, "Servers and identity"); so the identity is created once,
here, and every later start reuses it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from datasites.errors import FedsiteError
from policies.durable import read_json, write_json_atomic
from policies.fingerprint import UnknownDatasetError, read_dataset_facts, record_dataset_facts
from policies.identity import IDENTITY_FILE, create_identity_key, identity_public_hex

FORMAT = 2
# Format 1 keyed researchers by e-mail and chained journals with plain SHA-256; a site migrates it at
# start (datasites.migrate), when syft's user table maps each e-mail to its immutable id.
MIGRATABLE_FORMATS = frozenset({1})
META_FILE = "fedsite.json"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_OTHERS = stat.S_IRWXG | stat.S_IRWXO  # the group's and everyone's permission bits
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_site_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise FedsiteError(
            f"site name {name!r} is invalid: use lowercase letters, digits and '-', e.g. site-a"
        )
    return name


@dataclass(frozen=True)
class SiteMeta:
    """What fedsite.json holds."""

    format: int  # layout version of the data dir
    name: str  # the site's name, as researchers see it
    server_uid: str  # uuid4 hex; syft's server id (must be uuid4 hex, docs/syft.md)
    admin_email: str  # the root admin's login
    created: str  # UTC ISO time of creation


@dataclass(frozen=True)
class ModeChange:
    """A file or folder of the data dir whose mode ``SiteDir.tighten_modes`` tightened."""

    path: Path  # relative to the data dir ("." for the dir itself)
    old: int  # permission bits before, e.g. 0o644
    new: int  # permission bits after: old without the group's and others' bits

    def describe(self) -> str:
        return f"{self.path} {self.old:04o} -> {self.new:04o}"


class SiteDir:
    """One datasite's data directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self._lock_handle: IO[str] | None = None

    # ---- layout ------------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def key_path(self) -> Path:
        return self.path / "secrets" / "signing_key"

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def syft_dir(self) -> Path:
        return self.path / "syft"

    @property
    def serve_info_path(self) -> Path:
        return self.path / "serve.json"

    # ---- create / open -----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.meta_path.is_file()

    def create(self, *, name: str, admin_email: str) -> SiteMeta:
        """Make a new data dir with a fresh identity; refuses a non-empty folder that is not one."""
        check_site_name(name)
        if self.path.exists() and any(self.path.iterdir()):
            if self.exists():
                raise FedsiteError(f"{self.path} already holds datasite {self.meta().name!r}: open it instead")
            raise FedsiteError(f"{self.path} is not empty and is not a Fedsite data dir: choose an empty folder")
        from syft.server.credentials import SyftSigningKey

        meta = SiteMeta(FORMAT, name, uuid.uuid4().hex, admin_email, datetime.now(UTC).isoformat())
        self.path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        (self.path / "secrets").mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        write_json_atomic(self.key_path, {"signing_key": str(SyftSigningKey.generate())}, mode=0o600)
        create_identity_key(self.path)
        write_json_atomic(self.meta_path, meta.__dict__)  # written last: its presence marks a complete dir
        return meta

    def meta(self, *, current: bool = True) -> SiteMeta:
        """Read and check fedsite.json; errors name the fix.

        ``current=False`` also accepts a format this version migrates (only the site's start does that).
        """
        if not self.path.is_dir():
            raise FedsiteError(
                f"data dir {self.path} does not exist: start the site once with "
                f"`fedsite serve --name NAME --data-dir {self.path}`"
            )
        if not self.exists():
            what = "empty" if not any(self.path.iterdir()) else "not a Fedsite data dir"
            raise FedsiteError(
                f"data dir {self.path} is {what}: start the site once with "
                f"`fedsite serve --name NAME --data-dir {self.path}`"
            )
        raw = read_json(self.meta_path)
        if raw.get("format") in MIGRATABLE_FORMATS and not current:
            return SiteMeta(**{k: raw[k] for k in SiteMeta.__dataclass_fields__})
        if raw.get("format") in MIGRATABLE_FORMATS:
            raise FedsiteError(
                f"data dir {self.path} is in Fedsite data format {raw['format']} (researchers keyed by e-mail, "
                f"unkeyed journals): start the site once (`fedsite serve --data-dir {self.path}`) to migrate it "
                f"to format {FORMAT}; no spend is lost"
            )
        if raw.get("format") != FORMAT:
            raise FedsiteError(
                f"data dir {self.path} was written by Fedsite data format {raw.get('format')!r}, this version "
                f"reads format {FORMAT}: use the matching Fedsite version or start a new data dir"
            )
        return SiteMeta(**{k: raw[k] for k in SiteMeta.__dataclass_fields__})

    def signing_key(self) -> str:
        return str(read_json(self.key_path)["signing_key"])

    def identity_public_hex(self) -> str:
        """What the other admins pin for this site in the federation roster."""
        return identity_public_hex(self.path)

    # ---- the serve lock ----------------------------------------------------------------------
    def acquire(self) -> None:
        """Hold the directory's lock for this process; refuse if another process serves it."""
        handle = open(self.path / "serve.lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            holder = self.serving()
            where = f" (pid {holder.get('pid')}, port {holder.get('port')})" if holder else ""
            raise FedsiteError(
                f"data dir {self.path} is already served by another process{where}: stop it first, "
                "or use another --data-dir"
            ) from None
        self._lock_handle = handle

    def release(self) -> None:
        if self._lock_handle is not None:
            self.serve_info_path.unlink(missing_ok=True)
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def record_serving(self, *, host: str, port: int, scheme: str = "http") -> None:
        """Write serve.json: where this process listens, and whether over ``http`` or ``https``."""
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be 'http' or 'https', not {scheme!r}")
        write_json_atomic(self.serve_info_path, {"host": host, "port": port, "scheme": scheme, "pid": os.getpid()})

    def serving(self) -> dict[str, Any] | None:
        """Where the serving process listens, if one runs (serve.json is removed on clean exit).

        ``scheme`` is ``http`` or ``https``; a serve.json written before TLS support has none (``http``).
        """
        try:
            return dict(json.loads(self.serve_info_path.read_text()))
        except (FileNotFoundError, ValueError):
            return None

    # ---- file modes --------------------------------------------------------------------------
    def tighten_modes(self) -> list[ModeChange]:
        """Take the group's and others' permissions off every folder and file of the data dir.

        Returns what changed (empty when everything was already private). Symbolic links are left
        alone (chmod would follow them out of the data dir). Raises FedsiteError, naming the fix and
        before changing anything, when a loose entry belongs to another user (this process may not
        chmod it), or when a chmod is refused.
        """
        loose = self._loose_entries()
        me = os.geteuid()
        foreign = [(path, info) for path, info in loose if info.st_uid != me and me != 0]
        if foreign:
            path, info = foreign[0]
            raise self._cannot_tighten(path, f"it belongs to uid {info.st_uid}, not to this user (uid {me})",
                                       len(foreign))
        changes = []
        for path, info in loose:
            old = stat.S_IMODE(info.st_mode)
            try:
                os.chmod(path, old & ~_OTHERS)
            except PermissionError as exc:
                raise self._cannot_tighten(path, f"chmod was refused ({exc.strerror})", 1) from None
            changes.append(ModeChange(path.relative_to(self.path), old, old & ~_OTHERS))
        return changes

    def _loose_entries(self) -> list[tuple[Path, os.stat_result]]:
        """The data dir and everything under it that the group or others may use, with its lstat."""
        paths = [self.path]
        for root, folders, files in os.walk(self.path):  # does not descend into linked folders
            paths += [Path(root) / name for name in folders + files]
        loose = []
        for path in paths:
            try:
                info = path.lstat()
            except FileNotFoundError:  # removed since the walk listed it
                continue
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & _OTHERS:
                loose.append((path, info))
        return loose

    def _cannot_tighten(self, path: Path, why: str, count: int) -> FedsiteError:
        mode = stat.S_IMODE(path.lstat().st_mode)
        more = f" (and {count - 1} more)" if count > 1 else ""
        return FedsiteError(
            f"data dir {self.path} is readable by other users and cannot be made private: {path} is "
            f"{mode:04o} and {why}{more}: as its owner run `chmod -R go-rwx {self.path}` (or `chown -R` it "
            "to the user that serves the site), then start again"
        )

    # ---- per-dataset facts -------------------------------------------------------------------
    def dataset_facts(self, dataset: str) -> dict[str, Any]:
        try:
            return read_dataset_facts(self.path, dataset)
        except UnknownDatasetError as exc:
            raise FedsiteError(f"{self.path}: {exc}") from None

    def record_dataset(self, dataset: str, facts: dict[str, Any]) -> None:
        record_dataset_facts(self.path, dataset, facts)

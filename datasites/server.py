"""Running a datasite: in-process (tests, demo) or as its own HTTP(S) server process (`fedsite serve`).

Both build the same syft ``Datasite`` from the data dir, with the identity, store and blob folder
stored there, the admin password given by the owner, ``dev_mode`` off (so tracebacks, which can
carry private values, never reach researchers) and guest signup off. Both make the data dir private
(0700 folders, 0600 files) before the site starts and create files under umask 0o077 while it runs.

`fedsite serve` speaks HTTPS when given a certificate and key. Plain HTTP carries the admin's and the
researchers' passwords, syft's session keys, code and results in clear, so it listens only on loopback
unless the owner passes ``insecure_http`` (for a TLS-terminating proxy on the same host, say).
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from datasites.errors import FedsiteError
from datasites.guard import register_site, unregister_site
from datasites.http_app import SERVED_ROUTES, make_app
from datasites.migrate import BACKUP_DIR, migrate_format1, researcher_ids
from datasites.secrets import check_password_strength
from datasites.sitedir import FORMAT, SiteDir, SiteMeta, check_site_name
from datasites.syft_patches import install as install_syft_patches
from datasites.transport import check_port_free, check_tls_files, check_transport, is_loopback
from policies.submission import load_runtime
from policies.syft_client import SiteConnectionError, quiet
from policies.syft_client import login as client_login

DEFAULT_HOST = "127.0.0.1"
PRIVATE_UMASK = 0o077  # files 0600, folders 0700


def default_admin_email(name: str) -> str:
    return f"admin@{name}.fedsite.org"


def check_site_device(device: str) -> str:
    """The torch device a site trains approved rounds on, checked against this machine's hardware.

    Raises FedsiteError naming the fix for a malformed device, a kind other than CPU or CUDA, or a GPU
    that torch cannot see here. Returns the device as given.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FedsiteError(f"--device {device!r} is not a torch device ({exc}): use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise FedsiteError(f"--device {device!r}: a site trains on cpu or cuda, not {parsed.type}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FedsiteError(f"--device {device!r}: torch sees no CUDA GPU on this machine: use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise FedsiteError(f"--device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _prepare_syft_environment() -> None:
    for variable in ("SERVER_UID", "SERVER_PRIVATE_KEY"):  # would override the data dir's identity
        os.environ.pop(variable, None)


def open_site_dir(data_dir: str | os.PathLike[str], *, name: str | None, admin_email: str | None) -> SiteDir:
    """Check (and, for a new or empty folder, plan) the data dir; changes nothing on disk."""
    site = SiteDir(data_dir)
    if site.exists():
        meta = site.meta(current=False)  # an older format is migrated at start (launch_in_process)
        if name is not None and name != meta.name:
            raise FedsiteError(f"data dir {site.path} belongs to site {meta.name!r}, not {name!r}: fix --name")
    else:
        if name is None:
            site.meta()  # raises the "does not exist / empty" error with its fix
        check_site_name(str(name))
        if site.path.exists() and any(site.path.iterdir()):
            site.meta()
    return site


def _create_private_files() -> None:
    """Files and folders this process creates from now on are the owner's alone (0600 / 0700).

    The umask is process-wide (there is no per-thread one). That is right for `fedsite serve`: the
    process serves one data dir, and everything it writes (syft's SQLite store with its -wal/-shm
    files, blobs, journals, syft's job workers' files) belongs to that site. In-process sites (tests,
    the demo) share their process with the caller, whose files then are born private too: stricter,
    never looser, and nothing a site writes is meant to be shared.
    """
    os.umask(PRIVATE_UMASK)


def _tighten_data_dir(site: SiteDir) -> None:
    """Make the data dir private, saying what was open; refuse (naming the fix) if it cannot be."""
    changes = site.tighten_modes()
    if changes:
        shown = ", ".join(change.describe() for change in changes[:5])
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        print(f"fedsite: data dir {site.path} was open to other users; made {len(changes)} entries private: "
              f"{shown}{more}", file=sys.stderr, flush=True)


def build_datasite(site: SiteDir, *, admin_password: str, db_url: str | None = None, n_consumers: int = 0) -> Any:
    """The syft Datasite for this data dir (its own identity, store and blobs)."""
    meta = site.meta(current=False)
    _prepare_syft_environment()
    install_syft_patches()  # checks the syft version before syft builds anything
    with quiet():
        from syft.server.credentials import SyftSigningKey
        from syft.server.datasite import Datasite
        from syft.store.blob_storage.on_disk import OnDiskBlobStorageClientConfig, OnDiskBlobStorageConfig
        from syft.store.db.sqlite import SQLiteDBConfig
        from syft.types.uid import UID

        (site.syft_dir / "db").mkdir(parents=True, exist_ok=True)
        (site.syft_dir / "blob").mkdir(parents=True, exist_ok=True)
        worker = Datasite(
            name=meta.name,
            id=UID(meta.server_uid),
            signing_key=SyftSigningKey.from_string(site.signing_key()),
            db_config=None if db_url else SQLiteDBConfig(filename=f"{meta.server_uid}_json.db", path=site.syft_dir / "db"),
            db_url=db_url,
            blob_storage_config=OnDiskBlobStorageConfig(
                client_config=OnDiskBlobStorageClientConfig(base_directory=site.syft_dir / "blob")
            ),
            root_email=meta.admin_email,
            root_username=f"{meta.name} admin",
            root_password=admin_password,
            dev_mode=False,
            deployment_type="python",
            n_consumers=n_consumers,
            create_producer=n_consumers > 0,
        )
    _enforce_no_signup(worker)
    return worker


def _enforce_no_signup(worker: Any) -> None:
    """Guest signup stays off even if an earlier run (or syft's env) turned it on."""
    if not worker.settings.signup_enabled:
        return
    from syft.service.context import AuthedServiceContext
    from syft.service.settings.settings import ServerSettingsUpdate
    from syft.service.user.user_roles import ServiceRole

    context = AuthedServiceContext(server=worker, credentials=worker.verify_key, role=ServiceRole.ADMIN)
    worker.services.settings._update(context=context, settings=ServerSettingsUpdate(signup_enabled=False)).unwrap()


def login(url_or_handle: Any, *, email: str, password: str, port: int | None = None) -> Any:
    """Log in to a site (a ServerHandle in-process, or an http URL with a port); one clear error."""
    try:
        return client_login(url_or_handle, email=email, password=password, port=port)
    except SiteConnectionError as exc:
        raise FedsiteError(str(exc)) from None


@dataclass
class InProcessSite:
    """A datasite running inside this process."""

    site: SiteDir
    meta: SiteMeta
    worker: Any
    handle: Any

    def login(self, *, email: str, password: str) -> Any:
        return login(self.handle, email=email, password=password)

    def stop(self) -> None:
        unregister_site(self.meta.server_uid)
        try:
            with quiet():
                self.worker.stop()
        finally:
            self.site.release()


def launch_in_process(
    data_dir: str | os.PathLike[str],
    *,
    admin_password: str,
    name: str | None = None,
    admin_email: str | None = None,
    db_url: str | None = None,
    n_consumers: int = 0,
    device: str = "cpu",
) -> InProcessSite:
    """Open (creating on first use) the site in ``data_dir`` and run it in this process.

    ``device`` is where approved rounds train (``cpu``, ``cuda``, ``cuda:N``): the site's hardware, so the
    owner's choice, not the researcher's; it changes speed, never the privacy accounting.

    Every start makes the data dir private (``SiteDir.tighten_modes``: folders 0700, files 0600, saying
    on stderr what it changed) or refuses, naming the fix, when it cannot; from then on this process
    creates files under umask 0o077 (``_create_private_files``).
    """
    check_password_strength(admin_password)
    check_site_device(device)
    site = open_site_dir(data_dir, name=name, admin_email=admin_email)
    _create_private_files()
    if not site.exists():
        site.create(name=str(name), admin_email=admin_email or default_admin_email(str(name)))
    site.acquire()
    try:
        _tighten_data_dir(site)
        worker = build_datasite(site, admin_password=admin_password, db_url=db_url, n_consumers=n_consumers)
        with quiet():
            from syft.orchestra import ServerHandle

            handle = ServerHandle(
                server_type=worker.server_type,
                deployment_type=worker.deployment_type,
                name=worker.name,
                server_side_type=worker.server_side_type,
                python_server=worker,
                shutdown=worker.stop,
            )
        running = InProcessSite(site=site, meta=site.meta(current=False), worker=worker, handle=handle)
        _check_admin_password(running, admin_password)
        _migrate_if_needed(running)
        register_site(str(worker.id.no_dash), name=running.meta.name, data_dir=site.path, device=device)
        return running
    except BaseException:
        site.release()
        raise


def _migrate_if_needed(running: InProcessSite) -> None:
    """Bring an older data dir to the current format (datasites.migrate) before anyone is served."""
    if running.meta.format == FORMAT:
        return
    users = running.worker.services.user.stash.get_all(credentials=running.worker.verify_key).unwrap()
    try:
        done = migrate_format1(running.site, researcher_ids(users))
    except FedsiteError:
        with quiet():
            running.worker.stop()
        raise
    running.meta = running.site.meta()
    print(f"fedsite: migrated data dir {running.site.path} to format {FORMAT} ({len(done)} journals re-keyed by "
          f"researcher id and MACed; the old files are in {BACKUP_DIR}/)", file=sys.stderr, flush=True)


def _check_admin_password(running: InProcessSite, admin_password: str) -> None:
    """syft uses the password only when it first creates the admin; check it on every start."""
    try:
        running.login(email=running.meta.admin_email, password=admin_password)
    except FedsiteError:
        with quiet():
            running.worker.stop()
        raise FedsiteError(
            f"the admin password does not match the one site {running.meta.name!r} was created with: "
            "check FEDSITE_ADMIN_PASSWORD"
        ) from None


def serve(
    data_dir: str | os.PathLike[str],
    *,
    admin_password: str,
    name: str | None,
    port: int,
    host: str = DEFAULT_HOST,
    admin_email: str | None = None,
    db_url: str | None = None,
    n_consumers: int = 0,
    device: str = "cpu",
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    insecure_http: bool = False,
) -> None:
    """Serve the site over HTTP(S) in this process until SIGTERM/SIGINT; then stop cleanly (``device`` as in
    ``launch_in_process``).

    The round runtime is loaded before the port opens: the first approved call then costs what any
    other does, instead of the imports (seconds) while the researcher and the other sites wait on it.

    With ``tls_cert`` and ``tls_key`` (PEM) the site serves HTTPS; without them it serves plain HTTP,
    which ``check_transport`` allows on a non-loopback ``host`` only with ``insecure_http`` (and then a
    warning goes to stderr).
    """
    scheme = check_transport(host, tls_cert=tls_cert, tls_key=tls_key, insecure_http=insecure_http)
    check_password_strength(admin_password)
    check_site_device(device)
    site = open_site_dir(data_dir, name=name, admin_email=admin_email)
    _create_private_files()
    if site.exists():
        site.acquire()  # a second serve on this dir is refused before anything else
        site.release()
    check_port_free(host, port)
    running = launch_in_process(
        data_dir, admin_password=admin_password, name=name, admin_email=admin_email, db_url=db_url,
        n_consumers=n_consumers, device=device,
    )
    try:
        print(f"loaded the round runtime (torch, transformers, opacus, peft) in {load_runtime():.1f} s", flush=True)
        app = make_app(running.worker)
        running.site.record_serving(host=host, port=port, scheme=scheme)
        if scheme == "http" and not is_loopback(host):
            _warn_insecure_http(host, port)
        import uvicorn

        # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler it found; make
        # that handler a normal exit so that the finally below closes the store and frees the lock.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        cert, key = (os.fspath(tls_cert), os.fspath(tls_key)) if tls_cert and tls_key else (None, None)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                    ssl_certfile=cert, ssl_keyfile=key)
    finally:
        running.stop()


def _warn_insecure_http(host: str, port: int) -> None:
    rule = "!" * 100
    print(f"{rule}\nWARNING: --insecure-http: this site listens on {host}:{port} over PLAIN HTTP. Admin and researcher "
          "passwords,\nsession keys, code and results travel IN CLEAR to anyone on the network path. Serve HTTPS "
          f"with --tls-cert/--tls-key.\n{rule}", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


__all__ = ["SERVED_ROUTES", "InProcessSite", "check_port_free", "check_site_device", "check_tls_files",
           "check_transport", "default_admin_email", "is_loopback", "launch_in_process", "login", "make_app",
           "open_site_dir", "quiet", "serve"]

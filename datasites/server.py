"""Running a datasite: in-process (tests, demo) or as its own HTTP server process (`fedsite serve`).

Both build the same syft ``Datasite`` from the data dir, with the identity, store and blob folder
stored there, the admin password given by the owner, ``dev_mode`` off (so tracebacks, which can
carry private values, never reach researchers) and guest signup off.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

from datasites.errors import FedsiteError
from datasites.guard import register_site, unregister_site
from datasites.secrets import check_password_strength
from datasites.server_errors import relay_unexpected_server_errors
from datasites.sitedir import SiteDir, SiteMeta, check_site_name
from datasites.syft_speedups import install_syft_speedups
from policies.submission import load_runtime
from policies.syft_client import SiteConnectionError, prepare_syft_environment, quiet
from policies.syft_client import login as client_login

DEFAULT_HOST = "127.0.0.1"


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
    prepare_syft_environment()
    for variable in ("SERVER_UID", "SERVER_PRIVATE_KEY"):  # would override the data dir's identity
        os.environ.pop(variable, None)


def open_site_dir(data_dir: str | os.PathLike[str], *, name: str | None, admin_email: str | None) -> SiteDir:
    """Check (and, for a new or empty folder, plan) the data dir; changes nothing on disk."""
    site = SiteDir(data_dir)
    if site.exists():
        meta = site.meta()
        if name is not None and name != meta.name:
            raise FedsiteError(f"data dir {site.path} belongs to site {meta.name!r}, not {name!r}: fix --name")
    else:
        if name is None:
            site.meta()  # raises the "does not exist / empty" error with its fix
        check_site_name(str(name))
        if site.path.exists() and any(site.path.iterdir()):
            site.meta()
    return site


def check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise FedsiteError(f"--port {port} is out of range: use 1024-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise FedsiteError(f"port {port} on {host} is in use ({exc.strerror}): choose another --port") from None


def build_datasite(site: SiteDir, *, admin_password: str, db_url: str | None = None, n_consumers: int = 0) -> Any:
    """The syft Datasite for this data dir (its own identity, store and blobs)."""
    meta = site.meta()
    _prepare_syft_environment()
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
    install_syft_speedups()
    relay_unexpected_server_errors()
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
    """
    check_password_strength(admin_password)
    check_site_device(device)
    site = open_site_dir(data_dir, name=name, admin_email=admin_email)
    if not site.exists():
        site.create(name=str(name), admin_email=admin_email or default_admin_email(str(name)))
    site.acquire()
    try:
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
        running = InProcessSite(site=site, meta=site.meta(), worker=worker, handle=handle)
        _check_admin_password(running, admin_password)
        register_site(str(worker.id.no_dash), name=running.meta.name, data_dir=site.path, device=device)
        return running
    except BaseException:
        site.release()
        raise


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
) -> None:
    """Serve the site over HTTP in this process until SIGTERM/SIGINT; then stop cleanly (``device`` as in
    ``launch_in_process``).

    The round runtime is loaded before the port opens: the first approved call then costs what any
    other does, instead of the imports (seconds) while the researcher and the other sites wait on it.
    """
    check_password_strength(admin_password)
    check_site_device(device)
    site = open_site_dir(data_dir, name=name, admin_email=admin_email)
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
        app = _make_app(running.worker)
        running.site.record_serving(host=host, port=port)
        import uvicorn

        # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler it found; make
        # that handler a normal exit so that the finally below closes the store and frees the lock.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        running.stop()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _make_app(worker: Any) -> Any:
    """syft's HTTP API for ``worker`` (as syft.server.uvicorn.app_factory builds it), without CORS."""
    from fastapi import APIRouter, FastAPI
    from syft.server.routes import make_routes

    app = FastAPI(title=worker.name)
    api_router = APIRouter()
    api_router.include_router(make_routes(worker=worker))
    app.include_router(api_router, prefix="/api/v2")
    return app

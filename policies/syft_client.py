"""Talking to a syft 0.9.5 datasite as a client, quietly, with one clear error per failure.

Used by the site's admin tools and by researchers alike (what both sides need lives in
``policies``). syft prints, logs and draws progress bars where a library should not: its logs and progress
bars are silenced once per process by ``policies.syft_patches.install()`` (which ``login`` calls), and its
prints by ``quiet()`` around the calls that print (unless ``--verbose``).

TLS: syft 0.9.5's HTTP client verifies certificates with ``requests`` (its session passes
``verify=True``, so ``$REQUESTS_CA_BUNDLE`` applies; its API calls use ``requests.post``), except that
``$IGNORE_TLS_ERRORS`` turns verification off, and it sends every https request to port 443 whatever
port was given. ``login(..., ca=...)`` pins a connection to one CA bundle, refuses
``$IGNORE_TLS_ERRORS``, and keeps the port (see ``login``).
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import requests  # type: ignore[import-untyped]
from requests.adapters import HTTPAdapter  # type: ignore[import-untyped]
from urllib3.util.retry import Retry

from policies.syft_patches import install, is_verbose


class SiteConnectionError(ConnectionError):
    """Logging in to a datasite failed; the message says why and what to check."""


_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_stdout: TextIO | None = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence syft's prints (``print`` to stdout) while inside; nothing when ``--verbose``.

    syft's logs and progress bars are silenced once, by ``install()``; its prints can only be caught
    here. ``sys.stdout`` is process-wide, and the federated loop calls sites from several threads: a
    plain ``redirect_stdout`` per thread restores the streams out of order and can leave stdout pointing
    at a discarded buffer. So the first ``quiet`` in swaps stdout and the last one out restores it.
    """
    global _quiet_depth, _saved_stdout
    if is_verbose():
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            _saved_stdout, sys.stdout = sys.stdout, io.StringIO()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_stdout is not None:
                sys.stdout, _saved_stdout = _saved_stdout, None


def login(
    url_or_handle: Any, *, email: str, password: str, port: int | None = None, ca: str | Path | None = None
) -> Any:
    """Log in to a site: a ServerHandle in-process, or a URL (``http://`` or ``https://``) with a port.

    A researcher logs in to a site that serves TLS (``fedsite serve --tls-cert ... --tls-key ...``) with::

        client = login("https://site-a.example.org", port=8443, email=..., password=..., ca="site-ca.pem")

    ``ca`` is the PEM bundle of the certificate authority that signed the site's certificate (its admin
    hands it over with the login). Every request of the returned client, including the API calls that
    syft sends outside its session, then verifies the site's certificate and host name against that
    bundle, and only that bundle; plain ``http`` is refused on such a client. Without ``ca``, an https
    site's certificate is checked against the default trust store (or ``$REQUESTS_CA_BUNDLE``).
    Verification is never turned off: syft 0.9.5 skips it when ``$IGNORE_TLS_ERRORS`` is true, so an
    https login with that variable set is refused.
    """
    install()
    with quiet():
        import syft as sy
        from syft.types.errors import SyftException

        if isinstance(url_or_handle, str):
            url_or_handle = url_or_handle.rstrip("/")
            _check_transport(url_or_handle, ca)
        try:
            if isinstance(url_or_handle, str) and ca is not None:
                return _login_with_ca(url_or_handle, port=port, email=email, password=password, ca=Path(ca))
            if isinstance(url_or_handle, str):
                return sy.login(url=url_or_handle, port=port, email=email, password=password)
            return url_or_handle.login(email=email, password=password)
        except SyftException as exc:
            message = str(getattr(exc, "public_message", exc)).strip()
            if "Invalid credentials" in message or "Item not found" in message:
                raise SiteConnectionError(f"login refused for {email}: wrong email or password") from None
            raise SiteConnectionError(f"login to {url_or_handle} failed: {message}") from None
        except SiteConnectionError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection failures of every kind become one line
            raise _connection_error(url_or_handle, port, exc, ca) from None


def _check_transport(url: str, ca: str | Path | None) -> None:
    """Refuse a CA for plain http, a CA file that is not there, and syft's switch that skips verification."""
    from syft.util.util import verify_tls

    https = url.lower().startswith("https://")
    if ca is not None and not https:
        raise SiteConnectionError(f"a CA verifies https only, and {url} is plain http: use https://")
    if ca is not None and not Path(ca).is_file():
        raise SiteConnectionError(f"CA bundle {ca} does not exist: pass the PEM file the site's admin gave you")
    if https and not verify_tls():
        raise SiteConnectionError(
            f"IGNORE_TLS_ERRORS is set, which makes syft skip the certificate check of {url}: unset it "
            "(and pass the site's CA as ca=... instead)"
        )


_https_ports_kept = False


def _keep_explicit_https_ports() -> None:
    """Make syft 0.9.5 keep the port of an https URL (idempotent; process-wide).

    syft's ``ServerURL.from_url`` sets the port of every ``https`` URL to 443, even one that names
    another, and ``ServerURL.__copy__`` re-parses the URL with it; the connection copies its URL for
    every request path (``with_path``), so a client of ``https://host`` on port 8443 sent its requests
    to port 443. Here ``from_url`` keeps a port the URL names (443 stays the default) and ``__copy__``
    copies the fields. http URLs parse as before.
    """
    global _https_ports_kept
    from urllib.parse import urlsplit

    from syft.types.server_url import ServerURL

    if _https_ports_kept:
        return
    syft_from_url = ServerURL.from_url

    def from_url(cls: type[ServerURL], url: str | ServerURL) -> ServerURL:
        server_url = syft_from_url(url)
        if isinstance(url, str):
            named = urlsplit(url if "://" in url else f"http://{url}").port
            if named is not None:
                server_url.port = named
        return server_url

    def copy_fields(self: ServerURL) -> ServerURL:
        dupe = object.__new__(type(self))
        dupe.__dict__.update(self.__dict__)
        return dupe

    ServerURL.from_url = classmethod(from_url)
    ServerURL.__copy__ = copy_fields
    _https_ports_kept = True


def _connection_error(url: Any, port: int | None, exc: Exception, ca: str | Path | None) -> SiteConnectionError:
    if isinstance(exc, requests.exceptions.SSLError):
        trusted = f"the CA in {ca}" if ca is not None else "the default trust store"
        return SiteConnectionError(
            f"the certificate of {url}:{port} is not trusted by {trusted} (certificate verify failed, or its "
            "name does not match): pass the CA that signed the site's certificate, ca=CA.pem (`--ca CA.pem`)"
        )
    return SiteConnectionError(
        f"cannot reach datasite at {url}:{port} ({type(exc).__name__}): is `fedsite serve` running, "
        "and is it http or https?"
    )


def _login_with_ca(url: str, *, port: int | None, email: str, password: str, ca: Path) -> Any:
    """``sy.login`` (``syft.client.client.connect`` then ``client.login``) on a connection pinned to ``ca``."""
    from syft.client.client import HTTPConnection
    from syft.types.server_url import ServerURL

    server_url = ServerURL.from_url(url)
    if port is not None:
        server_url.set_port(int(port))
    connection = HTTPConnection(url=server_url)
    connection.session_cache = CAPinnedSession(ca)
    client_type = connection.get_client_type().unwrap()
    return client_type(connection=connection).login(email=email, password=password)


class _CAPinnedAdapter(HTTPAdapter):
    """Sends https requests verifying the server against one CA bundle, whatever ``verify`` the caller passed.

    syft passes ``verify=verify_tls()`` on every session request (False when ``$IGNORE_TLS_ERRORS`` is set),
    and requests swaps ``verify=True`` for ``$REQUESTS_CA_BUNDLE``; both are overridden here, at the last
    step before the connection, so no code path above can loosen it.
    """

    def __init__(self, ca: str) -> None:
        super().__init__(max_retries=Retry(total=3, backoff_factor=0.5))  # as syft's own session
        self.ca = ca

    def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: Any = True,
             cert: Any = None, proxies: Any = None) -> Any:
        return super().send(request, stream=stream, timeout=timeout, verify=self.ca, cert=cert, proxies=proxies)


class _RefusePlainHTTP(HTTPAdapter):
    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        raise requests.exceptions.SSLError(f"plain http to {request.url} refused on a client pinned to a CA")


class CAPinnedSession(requests.Session):
    """A requests session that trusts exactly the CA bundle ``ca`` and sends nothing over plain http.

    Proxies from the environment still apply (the tunnel ends at the site, whose certificate is checked);
    ``$REQUESTS_CA_BUNDLE`` does not (the adapter replaces whatever ``verify`` reaches it).
    """

    def __init__(self, ca: str | Path) -> None:
        super().__init__()
        self.ca = str(Path(ca).resolve())
        self.mount("https://", _CAPinnedAdapter(self.ca))
        self.mount("http://", _RefusePlainHTTP())


_api_calls_rerouted = False


def _route_api_calls_through_the_session() -> None:
    """Make syft send a pinned connection's API calls through its session (idempotent; process-wide).

    syft 0.9.5's ``HTTPConnection.make_call`` (every API call) posts with the module-level
    ``requests.post``, outside the connection's session, so the session's CA would not apply to it.
    Connections without a ``CAPinnedSession`` keep syft's own method.
    """
    global _api_calls_rerouted
    from syft.client.client import HTTPConnection

    if _api_calls_rerouted:
        return
    syft_make_call: Callable[[Any, Any], Any] = HTTPConnection.make_call

    def make_call(self: Any, signed_call: Any) -> Any:
        if isinstance(self.session_cache, CAPinnedSession):
            return _make_call_pinned(self, self.session_cache, signed_call)
        return syft_make_call(self, signed_call)

    HTTPConnection.make_call = make_call
    _api_calls_rerouted = True


def _make_call_pinned(connection: Any, session: CAPinnedSession, signed_call: Any) -> Any:
    """syft's ``HTTPConnection.make_call`` (without its rathole tunnel), posting through ``session``."""
    from syft.serde.deserialize import _deserialize
    from syft.serde.serialize import _serialize

    if connection.rtunnel_token:
        raise SiteConnectionError("a CA-pinned client does not support syft's rathole tunnels")
    response = session.post(url=str(connection.api_url), data=_serialize(obj=signed_call, to_bytes=True),
                            headers=connection.headers)
    if response.status_code != 200:
        raise requests.ConnectionError(f"Failed to fetch metadata. Response returned with code {response.status_code}")
    return _deserialize(response.content, from_bytes=True)

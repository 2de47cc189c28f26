"""Checks of the address and transport a `fedsite serve` site listens on, made before the site starts.

Plain HTTP carries the admin's and the researchers' passwords, syft's session keys, code and results in
clear, so a site listens only on loopback unless it has a certificate and key (HTTPS) or the owner
passes ``insecure_http``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from pathlib import Path

from datasites.errors import FedsiteError


def check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise FedsiteError(f"--port {port} is out of range: use 1024-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise FedsiteError(f"port {port} on {host} is in use ({exc.strerror}): choose another --port") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_transport(
    host: str, *, tls_cert: str | os.PathLike[str] | None, tls_key: str | os.PathLike[str] | None,
    insecure_http: bool,
) -> str:
    """The scheme a site serves (``https`` or ``http``) under the flags given; refuses unsafe or unclear ones.

    Plain HTTP on an address other machines reach would send passwords and session keys in clear, so
    a non-loopback ``host`` needs TLS or an explicit ``insecure_http``. The TLS files are checked here,
    before the site starts: both given, present, the key not readable by every user, and loadable as a
    certificate with its key.
    """
    if (tls_cert is None) != (tls_key is None):
        raise FedsiteError("--tls-cert and --tls-key go together: pass both (the certificate chain and its "
                           "private key, PEM)")
    if tls_cert is not None and tls_key is not None:
        if insecure_http:
            raise FedsiteError("--insecure-http contradicts --tls-cert/--tls-key: drop one of them")
        check_tls_files(Path(tls_cert), Path(tls_key))
        return "https"
    if not is_loopback(host) and not insecure_http:
        raise FedsiteError(
            f"--host {host} is reachable from other machines, and plain HTTP sends the admin's and researchers' "
            "passwords and session keys in clear: pass --tls-cert CERT.pem --tls-key KEY.pem, or listen on "
            "127.0.0.1 (behind a TLS proxy), or accept the risk with --insecure-http"
        )
    return "http"


def check_tls_files(cert: Path, key: Path) -> None:
    """Refuse a missing certificate or key, a key file every user can read, or a pair that does not load."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            raise FedsiteError(f"{flag} {path} does not exist: pass the PEM file")
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & stat.S_IRWXO:
        raise FedsiteError(f"--tls-key {key} is mode {mode:04o}, readable by every user of this machine: "
                           f"`chmod 600 {key}`")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_refuse_key_password)
    except ssl.SSLError as exc:
        raise FedsiteError(f"--tls-cert {cert} and --tls-key {key} do not load as a certificate and its private "
                           f"key ({exc.reason or exc}): pass the PEM certificate chain and the key it was made "
                           "for") from None


def _refuse_key_password() -> bytes:
    raise FedsiteError("the --tls-key file is encrypted, and `fedsite serve` cannot ask for its passphrase: "
                       "store it decrypted and chmod 600 (`openssl pkey -in KEY -out KEY.plain`)")

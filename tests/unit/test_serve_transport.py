"""`fedsite serve`'s transport flags: the database URL stays off the command line, plain HTTP stays on
loopback, TLS files are checked before start, and a client's CA is the only trust it uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from datasites.errors import FedsiteError
from datasites.secrets import database_url
from datasites.server import check_transport, is_loopback
from fedsite.cli import main
from policies import syft_client
from policies.syft_client import CAPinnedSession, SiteConnectionError
from tests.tls_certs import TLSFiles, make_tls_files

pytestmark = pytest.mark.unit

DB_PASSWORD = "S3cret-db-pw"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def serve_argv(tmp_path: Path, *flags: str) -> list[str]:
    return ["serve", "--name", "site-a", "--data-dir", str(tmp_path / "site-a"), "--port", "8999", *flags]


# ---- the database URL --------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    f"postgresql://fedsite:{DB_PASSWORD}@127.0.0.1:5432/site",
    f"postgresql://fedsite@127.0.0.1/site?password={DB_PASSWORD}",
    f"postgresql://127.0.0.1/site?sslmode=require&PASSWORD={DB_PASSWORD}",
])
def test_a_db_url_with_a_password_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(FedsiteError, match=r"--db-url contains a password, which every user of this machine can "
                                           r"read in `ps` .* pass --db-url-file PATH \(chmod 600\), or set "
                                           r"\$FEDSITE_DB_URL") as refused:
        database_url(url=url, file=None)
    assert DB_PASSWORD not in str(refused.value)


def test_the_cli_refuses_it_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(serve_argv(tmp_path, "--db-url", f"postgresql://u:{DB_PASSWORD}@h/db"))

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedsite: error: --db-url contains a password")
    assert DB_PASSWORD not in err
    assert not (tmp_path / "site-a").exists()


def test_a_db_url_without_a_password_may_be_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDSITE_DB_URL", raising=False)

    assert database_url(url="postgresql://fedsite@/site?host=/run/postgresql", file=None) == (
        "postgresql://fedsite@/site?host=/run/postgresql")
    assert database_url(url=None, file=None) is None


def test_the_db_url_comes_from_a_private_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql://fedsite:{DB_PASSWORD}@127.0.0.1:5432/site"
    private = tmp_path / "db-url"
    private.write_text(url + "\n")
    os.chmod(private, 0o600)
    read_only = tmp_path / "db-url-ro"
    read_only.write_text(url)
    os.chmod(read_only, 0o400)
    monkeypatch.setenv("FEDSITE_DB_URL", url + "-env")

    assert database_url(url=None, file=private) == url
    assert database_url(url=None, file=read_only) == url
    assert database_url(url=None, file=None) == url + "-env"


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o620])
def test_a_db_url_file_open_to_others_is_refused(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "db-url"
    path.write_text(f"postgresql://fedsite:{DB_PASSWORD}@127.0.0.1/site")
    os.chmod(path, loose)

    with pytest.raises(FedsiteError, match=rf"database URL file {path} is mode {loose:04o}, open to other users: "
                                           rf"make it private with `chmod 600 {path}`"):
        database_url(url=None, file=path)


def test_db_url_and_db_url_file_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FedsiteError, match=r"--db-url and --db-url-file both name the database: pass one"):
        database_url(url="postgresql://fedsite@/site", file=tmp_path / "x")


# ---- host and TLS ------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("LOCALHOST", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("site-a.example.org", False),
])
def test_which_hosts_are_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_http_on_loopback_is_allowed() -> None:
    assert check_transport("127.0.0.1", tls_cert=None, tls_key=None, insecure_http=False) == "http"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "site-a.example.org"])
def test_plain_http_elsewhere_needs_tls_or_insecure_http(host: str) -> None:
    with pytest.raises(FedsiteError, match=rf"--host {host} is reachable from other machines, and plain HTTP sends "
                                           r"the admin's and researchers' passwords .* pass --tls-cert CERT.pem "
                                           r"--tls-key KEY.pem, .* --insecure-http"):
        check_transport(host, tls_cert=None, tls_key=None, insecure_http=False)
    assert check_transport(host, tls_cert=None, tls_key=None, insecure_http=True) == "http"


def test_tls_on_any_host_serves_https(tls: TLSFiles) -> None:
    assert check_transport("0.0.0.0", tls_cert=tls.cert, tls_key=tls.key, insecure_http=False) == "https"
    assert check_transport("127.0.0.1", tls_cert=str(tls.cert), tls_key=str(tls.key), insecure_http=False) == "https"


def test_half_of_tls_or_tls_with_insecure_http_is_refused(tls: TLSFiles) -> None:
    with pytest.raises(FedsiteError, match=r"--tls-cert and --tls-key go together: pass both"):
        check_transport("0.0.0.0", tls_cert=tls.cert, tls_key=None, insecure_http=False)
    with pytest.raises(FedsiteError, match=r"--tls-cert and --tls-key go together"):
        check_transport("127.0.0.1", tls_cert=None, tls_key=tls.key, insecure_http=False)
    with pytest.raises(FedsiteError, match=r"--insecure-http contradicts --tls-cert/--tls-key: drop one"):
        check_transport("0.0.0.0", tls_cert=tls.cert, tls_key=tls.key, insecure_http=True)


def test_missing_or_world_readable_or_mismatched_tls_files_are_refused(tls: TLSFiles, tmp_path: Path) -> None:
    loose_key = tmp_path / "loose-key.pem"
    loose_key.write_bytes(tls.key.read_bytes())
    os.chmod(loose_key, 0o644)
    other = make_tls_files(tmp_path / "other")

    with pytest.raises(FedsiteError, match=rf"--tls-cert {tmp_path}/absent.pem does not exist"):
        check_transport("::1", tls_cert=tmp_path / "absent.pem", tls_key=tls.key, insecure_http=False)
    with pytest.raises(FedsiteError, match=rf"--tls-key {loose_key} is mode 0644, readable by every user of this "
                                           rf"machine: `chmod 600 {loose_key}`"):
        check_transport("::1", tls_cert=tls.cert, tls_key=loose_key, insecure_http=False)
    with pytest.raises(FedsiteError, match=r"do not load as a certificate and its private key \(KEY_VALUES_MISMATCH"):
        check_transport("::1", tls_cert=tls.cert, tls_key=other.key, insecure_http=False)


def test_an_encrypted_tls_key_is_refused_without_a_prompt(tmp_path: Path) -> None:
    encrypted = make_tls_files(tmp_path, passphrase=b"key passphrase")

    with pytest.raises(FedsiteError, match=r"the --tls-key file is encrypted, and `fedsite serve` cannot ask for "
                                           r"its passphrase"):
        check_transport("127.0.0.1", tls_cert=encrypted.cert, tls_key=encrypted.key, insecure_http=False)


def test_the_cli_refuses_a_public_host_without_tls(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", "Site-admin-Pw-2026!")

    code = main(serve_argv(tmp_path, "--host", "0.0.0.0"))

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedsite: error: --host 0.0.0.0 is reachable from other machines")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "site-a").exists()


def test_the_cli_passes_tls_and_the_db_url_to_serve(tmp_path: Path, tls: TLSFiles, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", "Site-admin-Pw-2026!")
    monkeypatch.setenv("FEDSITE_DB_URL", f"postgresql://fedsite:{DB_PASSWORD}@127.0.0.1/site")
    seen: dict[str, Any] = {}
    monkeypatch.setattr("datasites.server.serve", lambda data_dir, **kwargs: seen.update(kwargs))

    code = main(serve_argv(tmp_path, "--host", "0.0.0.0", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)))

    assert code == 0
    assert capsys.readouterr().out.startswith("serving site-a on https://0.0.0.0:8999 ")
    assert (seen["tls_cert"], seen["tls_key"], seen["insecure_http"]) == (str(tls.cert), str(tls.key), False)
    assert seen["db_url"] == f"postgresql://fedsite:{DB_PASSWORD}@127.0.0.1/site"


# ---- the client's trust ------------------------------------------------------------------------

def test_a_ca_is_for_https_and_must_exist(tls: TLSFiles, tmp_path: Path) -> None:
    with pytest.raises(SiteConnectionError, match=r"a CA verifies https only, and http://127.0.0.1 is plain http"):
        syft_client.login("http://127.0.0.1", port=1, email="a@b.org", password="x", ca=tls.ca)
    with pytest.raises(SiteConnectionError, match=rf"CA bundle {tmp_path}/absent.pem does not exist"):
        syft_client.login("https://127.0.0.1", port=1, email="a@b.org", password="x", ca=tmp_path / "absent.pem")


def test_syfts_switch_that_skips_verification_is_refused(tls: TLSFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IGNORE_TLS_ERRORS", "true")

    for ca in (tls.ca, None):
        with pytest.raises(SiteConnectionError, match=r"IGNORE_TLS_ERRORS is set, which makes syft skip the "
                                                      r"certificate check of https://127.0.0.1: unset it"):
            syft_client.login("https://127.0.0.1", port=1, email="a@b.org", password="x", ca=ca)


def test_the_pinned_session_verifies_with_the_ca_whatever_the_caller_asks(
    tls: TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """syft passes verify=False when IGNORE_TLS_ERRORS is set; the adapter sends with the CA anyway."""
    from requests.adapters import HTTPAdapter

    sent: list[Any] = []

    def record(self: Any, request: Any, **kwargs: Any) -> None:
        sent.append(kwargs["verify"])
        raise ConnectionError("recorded")

    monkeypatch.setattr(HTTPAdapter, "send", record)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    session = CAPinnedSession(tls.ca)

    for verify in (False, True, "/some/other/bundle.pem"):
        with pytest.raises(ConnectionError, match="recorded"):
            session.get("https://127.0.0.1:1/api/v2/metadata", verify=verify)
    assert sent == [str(tls.ca.resolve())] * 3


def test_the_pinned_session_sends_nothing_over_plain_http(tls: TLSFiles) -> None:
    import requests

    with pytest.raises(requests.exceptions.SSLError, match=r"plain http to http://127.0.0.1:1/x refused on a client "
                                                           r"pinned to a CA"):
        CAPinnedSession(tls.ca).get("http://127.0.0.1:1/x")


def test_https_urls_keep_their_port() -> None:
    """syft 0.9.5 turned every https port into 443 (ServerURL.from_url and its copy in with_path)."""
    with syft_client.quiet():
        syft_client._keep_explicit_https_ports()
        from syft.client.client import HTTPConnection
        from syft.types.server_url import ServerURL

        url = ServerURL.from_url("https://127.0.0.1")
        url.set_port(8443)
        connection = HTTPConnection(url=url)

    assert str(connection.api_url) == "https://127.0.0.1:8443/api/v2/api_call"
    assert ServerURL.from_url("https://site.example.org:9443/x").port == 9443
    assert ServerURL.from_url("https://site.example.org").port == 443
    assert ServerURL.from_url("http://site.example.org").port == 80
    assert ServerURL.from_url("127.0.0.1:8080").port == 8080

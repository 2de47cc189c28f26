"""`fedsite serve --tls-cert --tls-key` over HTTPS: the admin's client with the site's CA gets in, a client
without it (or with another CA) is refused with a certificate error, plain http to the port gets nothing,
and every file the running site wrote is 0600 in 0700 folders."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import requests

from datasites.server import quiet
from policies.syft_client import SiteConnectionError, login
from tests.conftest import ADMIN_PASSWORD
from tests.e2e.conftest import ServedSite, fedsite
from tests.tls_certs import make_tls_files

pytestmark = pytest.mark.e2e

ADMIN = "admin@site-t.fedsite.org"


def modes(data_dir: Path) -> tuple[set[int], set[int], list[str]]:
    """The permission bits of the folders and of the files under ``data_dir``, and the files' names."""
    entries = [data_dir, *data_dir.rglob("*")]
    folders = {stat.S_IMODE(p.lstat().st_mode) for p in entries if p.is_dir()}
    files = [p for p in entries if p.is_file()]
    return folders, {stat.S_IMODE(p.lstat().st_mode) for p in files}, [str(p.relative_to(data_dir)) for p in files]


def test_https_site_opens_to_its_ca_only_and_keeps_its_files_private(serve_site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tls = make_tls_files(tmp_path / "tls")
    stranger = make_tls_files(tmp_path / "another-ca")
    site: ServedSite = serve_site("site-t")
    site.tls_cert, site.tls_key = tls.cert, tls.key
    site.start()
    site.wait_ready()
    assert json.loads((site.data_dir / "serve.json").read_text())["scheme"] == "https"

    admin = login(site.url, port=site.port, email=ADMIN, password=ADMIN_PASSWORD, ca=tls.ca)
    with quiet():
        import syft as sy

        assert [user.email for user in admin.users.get_all()] == [ADMIN]
        big = sy.ActionObject.from_obj(np.arange(300_000, dtype=np.float64)).send(admin)  # 2.4 MB: a blob
        assert float(big.get().sum()) == float(np.arange(300_000).sum())

    with pytest.raises(SiteConnectionError, match=r"the certificate of https://127.0.0.1:\d+ is not trusted by the "
                                                  r"default trust store"):
        login(site.url, port=site.port, email=ADMIN, password=ADMIN_PASSWORD)
    with pytest.raises(SiteConnectionError, match=rf"is not trusted by the CA in {stranger.ca}"):
        login(site.url, port=site.port, email=ADMIN, password=ADMIN_PASSWORD, ca=stranger.ca)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{site.port}/api/v2/metadata", timeout=10)
    with pytest.raises(SiteConnectionError, match=r"cannot reach datasite at http://127.0.0.1:\d+ .*is it http or "
                                                  r"https\?"):
        login("http://127.0.0.1", port=site.port, email=ADMIN, password=ADMIN_PASSWORD)

    with_ca = fedsite("admin", "requests", "--data-dir", str(site.data_dir), "--ca", str(tls.ca))
    without_ca = fedsite("admin", "requests", "--data-dir", str(site.data_dir))
    assert with_ca.returncode == 0, with_ca.stderr
    assert with_ca.stdout.strip() == "site site-t: no requests yet"
    assert without_ca.returncode == 2
    assert "is not trusted by the default trust store" in without_ca.stderr and "--ca CA.pem" in without_ca.stderr

    folders, files, names = modes(site.data_dir)  # while it runs: the SQLite store with its -wal/-shm, blobs
    assert folders == {0o700} and files == {0o600}, names
    assert any(name.startswith("syft/db/") and name.endswith("-wal") for name in names), names
    assert any(name.startswith("syft/blob/") for name in names), names
    assert site.terminate() == 0
    assert modes(site.data_dir)[:2] == ({0o700}, {0o600})
    assert "private:" not in site.log.read_text()  # a data dir born private has nothing to tighten

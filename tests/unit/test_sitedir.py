from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasites.errors import FedsiteError
from datasites.server import check_port_free, open_site_dir
from datasites.sitedir import FORMAT, SiteDir

pytestmark = pytest.mark.unit


def test_create_writes_a_stable_identity(tmp_path: Path) -> None:
    site = SiteDir(tmp_path / "a")

    meta = site.create(name="site-a", admin_email="admin@site-a.fedsite.org")
    reopened = SiteDir(tmp_path / "a").meta()

    assert reopened == meta
    assert meta.format == FORMAT == 2
    assert len(meta.server_uid) == 32 and int(meta.server_uid, 16) >= 0
    assert (site.key_path.stat().st_mode & 0o777) == 0o600
    assert SiteDir(tmp_path / "a").signing_key() == site.signing_key()
    assert (site.identity_path.stat().st_mode & 0o777) == 0o600
    assert SiteDir(tmp_path / "a").identity_public_hex() == site.identity_public_hex()
    assert len(bytes.fromhex(site.identity_public_hex())) == 32


def test_missing_and_empty_data_dirs_name_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    with pytest.raises(FedsiteError, match=r"does not exist: start the site once with `fedsite serve --name NAME"):
        SiteDir(tmp_path / "absent").meta()
    with pytest.raises(FedsiteError, match=r"is empty: start the site once with"):
        SiteDir(tmp_path / "empty").meta()


def test_foreign_folder_is_not_taken_over(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("x")

    with pytest.raises(FedsiteError, match=r"is not empty and is not a Fedsite data dir: choose an empty folder"):
        SiteDir(tmp_path).create(name="site-a", admin_email="a@b.org")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_incompatible_format_is_refused(tmp_path: Path) -> None:
    site = SiteDir(tmp_path)
    site.create(name="site-a", admin_email="a@b.org")
    meta = json.loads(site.meta_path.read_text())
    site.meta_path.write_text(json.dumps({**meta, "format": FORMAT + 1}))

    with pytest.raises(FedsiteError, match=rf"written by Fedsite data format {FORMAT + 1}, this version reads format 2: "
                                           r"use the matching Fedsite version or start a new data dir"):
        site.meta()
    with pytest.raises(FedsiteError, match=rf"written by Fedsite data format {FORMAT + 1}, this version reads format 2"):
        site.meta(current=False)


def test_second_holder_of_the_lock_is_refused(tmp_path: Path) -> None:
    first, second = SiteDir(tmp_path), SiteDir(tmp_path)
    first.create(name="site-a", admin_email="a@b.org")
    first.acquire()
    first.record_serving(host="127.0.0.1", port=8123)

    with pytest.raises(FedsiteError, match=r"already served by another process \(pid \d+, port 8123\): stop it first"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_wrong_site_name_and_bad_names_are_refused(tmp_path: Path) -> None:
    SiteDir(tmp_path).create(name="site-a", admin_email="a@b.org")

    with pytest.raises(FedsiteError, match=r"belongs to site 'site-a', not 'site-b': fix --name"):
        open_site_dir(tmp_path, name="site-b", admin_email=None)
    with pytest.raises(FedsiteError, match=r"site name 'Site A' is invalid"):
        open_site_dir(tmp_path / "new", name="Site A", admin_email=None)


def test_port_in_use_is_refused() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        with pytest.raises(FedsiteError, match=rf"port {port} on 127.0.0.1 is in use .*choose another --port"):
            check_port_free("127.0.0.1", port)

"""A data dir is the owner's alone: loose modes are tightened at start, or start is refused with the fix."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from datasites import server
from datasites.errors import FedsiteError
from datasites.sitedir import SiteDir
from policies.durable import write_bytes_atomic, write_json_atomic

pytestmark = pytest.mark.unit


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture()
def loose_site(tmp_path: Path) -> SiteDir:
    """A data dir as an older Fedsite left it: folders 0755, the store and the journals 0644."""
    site = SiteDir(tmp_path / "site-a")
    site.create(name="site-a", admin_email="admin@site-a.fedsite.org")
    (site.syft_dir / "db").mkdir(parents=True)
    (site.syft_dir / "db" / "uid_json.db").write_bytes(b"private rows")
    (site.path / "audit.jsonl").write_text("{}\n")
    for path in [site.path, site.syft_dir, site.syft_dir / "db", site.path / "secrets"]:
        os.chmod(path, 0o755)
    for path in [site.syft_dir / "db" / "uid_json.db", site.path / "audit.jsonl", site.meta_path]:
        os.chmod(path, 0o644)
    return site


def every_entry(site: SiteDir) -> list[Path]:
    return [site.path, *site.path.rglob("*")]


def test_loose_modes_are_tightened_and_reported(loose_site: SiteDir) -> None:
    changes = loose_site.tighten_modes()

    described = {change.describe() for change in changes}
    assert {". 0755 -> 0700", "syft 0755 -> 0700", "syft/db 0755 -> 0700", "secrets 0755 -> 0700",
            "syft/db/uid_json.db 0644 -> 0600", "audit.jsonl 0644 -> 0600", "fedsite.json 0644 -> 0600"} == described
    assert {mode(p) for p in every_entry(loose_site) if p.is_dir()} == {0o700}
    assert {mode(p) for p in every_entry(loose_site) if p.is_file()} == {0o600}
    assert loose_site.tighten_modes() == []  # a second start has nothing to do


def test_owner_bits_are_kept(tmp_path: Path) -> None:
    site = SiteDir(tmp_path)
    site.create(name="site-a", admin_email="a@b.org")
    os.chmod(site.meta_path, 0o444)  # read-only for its owner, readable by all

    site.tighten_modes()

    assert mode(site.meta_path) == 0o400


def test_a_file_of_another_user_refuses_start_and_changes_nothing(
    loose_site: SiteDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1 if real_uid else 4242)  # as if another user ran it

    with pytest.raises(FedsiteError, match=rf"data dir {loose_site.path} is readable by other users and cannot be "
                                           rf"made private: .* belongs to uid {real_uid}, not to this user .*"
                                           rf"run `chmod -R go-rwx {loose_site.path}`"):
        loose_site.tighten_modes()
    assert mode(loose_site.path / "audit.jsonl") == 0o644 and mode(loose_site.path) == 0o755


def test_a_refused_chmod_refuses_start_with_the_fix(loose_site: SiteDir, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refuse)

    with pytest.raises(FedsiteError, match=r"cannot be made private: .* is 0755 and chmod was refused "
                                           r"\(Operation not permitted\): as its owner run `chmod -R go-rwx "):
        loose_site.tighten_modes()


def test_links_are_not_followed_out_of_the_data_dir(tmp_path: Path) -> None:
    site = SiteDir(tmp_path / "site")
    site.create(name="site-a", admin_email="a@b.org")
    outside = tmp_path / "shared.txt"
    outside.write_text("not the site's")
    os.chmod(outside, 0o644)
    (site.path / "link").symlink_to(outside)

    site.tighten_modes()

    assert mode(outside) == 0o644


def test_a_start_tightens_and_says_so(loose_site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    server._tighten_data_dir(loose_site)

    err = capsys.readouterr().err
    assert err.startswith(f"fedsite: data dir {loose_site.path} was open to other users; made 7 entries private: ")
    assert "and 2 more" in err
    assert mode(loose_site.path / "audit.jsonl") == 0o600


def test_a_start_refuses_a_data_dir_it_cannot_tighten(loose_site: SiteDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """launch_in_process stops before building the site, and releases the data dir's lock."""
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    built: list[object] = []
    monkeypatch.setattr(server, "build_datasite", lambda *args, **kwargs: built.append(args))
    monkeypatch.setattr(server, "check_site_device", lambda device: device)  # no torch import here
    monkeypatch.setattr(os, "umask", lambda mask: 0o022)  # keep this test process's umask as it was

    with pytest.raises(FedsiteError, match=r"cannot be made private: .*`chmod -R go-rwx "):
        server.launch_in_process(loose_site.path, admin_password="Site-admin-Pw-2026!", name="site-a")
    assert built == []
    loose_site.acquire()  # the lock was released
    loose_site.release()


def test_files_are_born_private(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_bytes_atomic(tmp_path / "b.bin", b"\x00")

    assert mode(tmp_path / "a.json") == 0o600 and mode(tmp_path / "b.bin") == 0o600
    site = SiteDir(tmp_path / "new")
    site.create(name="site-a", admin_email="a@b.org")
    assert mode(site.path) == 0o700
    assert {mode(p) for p in site.path.rglob("*") if p.is_file()} == {0o600}


def test_the_site_umask_makes_new_files_private(tmp_path: Path) -> None:
    before = os.umask(0o022)
    try:
        server._create_private_files()
        (tmp_path / "store.db").write_bytes(b"x")
        (tmp_path / "blob").mkdir()
    finally:
        os.umask(before)

    assert mode(tmp_path / "store.db") == 0o600 and mode(tmp_path / "blob") == 0o700

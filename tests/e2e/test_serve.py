"""Two `fedsite serve` processes at once over HTTP: onboarding, access control, kill -9, clean stop."""

from __future__ import annotations

import psutil
import pytest

from datasites.mock import PUBLIC_MOCK_ROWS
from datasites.server import login, quiet
from tests.conftest import ADMIN_PASSWORD, RESEARCHER_PASSWORD
from tests.e2e.conftest import ServedSite, fedsite, port_open
from tests.e2e.kill import kill9

pytestmark = pytest.mark.e2e

RESEARCHER = "rita@uni.org"


def _onboard(site: ServedSite, index: int, imdb_dir) -> None:  # type: ignore[no-untyped-def]
    upload = fedsite("admin", "upload", "--data-dir", str(site.data_dir), "--imdb", str(imdb_dir), "--sites", "50",
                     "--site-index", str(index), "--epsilon", "8", "--delta", "1e-5")
    assert upload.returncode == 0, upload.stderr
    assert upload.stdout.startswith("uploaded imdb: 500 private reviews")
    assert "mock twin: 200 rows, 100 positive, from public defaults" in upload.stdout
    added = fedsite("admin", "add-researcher", "--data-dir", str(site.data_dir), "--name", "Rita", "--email",
                    RESEARCHER, env={"FEDSITE_RESEARCHER_PASSWORD": RESEARCHER_PASSWORD})
    assert added.returncode == 0, added.stderr


def _researcher_view(site: ServedSite) -> int:
    """Log in over HTTP as the researcher; return the mock's size after checking the private data is refused."""
    client = login("http://127.0.0.1", port=site.port, email=RESEARCHER, password=RESEARCHER_PASSWORD)
    with quiet():
        asset = client.datasets["imdb"].assets["reviews"]
        mock = asset.mock
        private = asset.data
    assert private is None
    return len(mock)


def test_two_sites_serve_at_once_and_survive_kill_9(serve_site, imdb_dir) -> None:  # type: ignore[no-untyped-def]
    site_a, site_b = serve_site("site-a"), serve_site("site-b")
    site_a.start()
    site_b.start()
    site_a.wait_ready()
    site_b.wait_ready()
    for site in (site_a, site_b):  # the round runtime is loaded before the port opens (not in the first round)
        assert "loaded the round runtime (torch, transformers, opacus, peft) in " in site.log.read_text()
    _onboard(site_a, 0, imdb_dir)
    _onboard(site_b, 1, imdb_dir)
    assert _researcher_view(site_a) == PUBLIC_MOCK_ROWS
    assert _researcher_view(site_b) == PUBLIC_MOCK_ROWS

    kill9(site_a)
    assert not port_open(site_a.port)
    assert _researcher_view(site_b) == PUBLIC_MOCK_ROWS  # the other site is unaffected
    site_a.start()
    site_a.wait_ready()

    assert _researcher_view(site_a) == PUBLIC_MOCK_ROWS
    budget = fedsite("admin", "budget", "--data-dir", str(site_a.data_dir))
    assert "imdb                           8      1e-05        500" in budget.stdout
    admin = login("http://127.0.0.1", port=site_a.port, email="admin@site-a.fedsite.org", password=ADMIN_PASSWORD)
    with quiet():
        assert sorted(u.email for u in admin.users.get_all()) == ["admin@site-a.fedsite.org", RESEARCHER]


def test_sigterm_stops_cleanly_with_no_orphans(serve_site) -> None:  # type: ignore[no-untyped-def]
    site = serve_site("site-c")
    site.start()
    site.wait_ready()
    assert site.process is not None
    children = psutil.Process(site.process.pid).children(recursive=True)

    returncode = site.terminate()

    assert returncode == 0
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    assert not (site.data_dir / "serve.json").exists()
    assert not port_open(site.port)


def test_bad_serve_invocations_fail_with_one_clear_line(serve_site, tmp_path) -> None:  # type: ignore[no-untyped-def]
    site = serve_site("site-d")
    site.start()
    site.wait_ready()

    same_dir = fedsite("serve", "--data-dir", str(site.data_dir), "--port", "1")
    same_port = fedsite("serve", "--name", "site-e", "--data-dir", str(tmp_path / "e"), "--port", str(site.port))
    weak = fedsite("serve", "--name", "site-f", "--data-dir", str(tmp_path / "f"), "--port", "8999",
                   env={"FEDSITE_ADMIN_PASSWORD": "changethis"})
    wrong = fedsite("admin", "add-researcher", "--data-dir", str(site.data_dir), "--name", "R", "--email", "r@x.org",
                    env={"FEDSITE_ADMIN_PASSWORD": "Not-the-Admin-Pw-9", "FEDSITE_RESEARCHER_PASSWORD": RESEARCHER_PASSWORD})
    missing = fedsite("admin", "budget", "--data-dir", str(tmp_path / "nowhere"))

    for result, message in [
        (same_dir, "is already served by another process"),
        (same_port, f"port {site.port} on 127.0.0.1 is in use"),
        (weak, "admin password is too weak"),
        (wrong, "login refused for admin@site-d.fedsite.org: wrong email or password"),
        (missing, "does not exist: start the site once with"),
    ]:
        assert result.returncode == 2
        assert result.stderr.startswith("fedsite: error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()

"""A site's training device is the owner's choice, checked against the machine before the site starts."""

import pytest
import torch

from datasites.errors import FedsiteError
from datasites.server import check_site_device, launch_in_process
from fedsite.cli import main as fedsite_main
from tests.conftest import ADMIN_PASSWORD

pytestmark = pytest.mark.unit


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_and_a_visible_gpu_are_accepted(monkeypatch):
    _gpus(monkeypatch, 2)

    assert [check_site_device(d) for d in ("cpu", "cpu:0", "cuda", "cuda:1")] == ["cpu", "cpu:0", "cuda", "cuda:1"]


@pytest.mark.parametrize(("device", "gpus", "message"), [
    ("gpu", 1, "is not a torch device"),
    ("mps", 1, "a site trains on cpu or cuda, not mps"),
    ("cuda", 0, "torch sees no CUDA GPU on this machine: use --device cpu"),
    ("cuda:2", 2, "this machine has 2 CUDA GPU(s), cuda:0 to cuda:1"),
])
def test_a_device_this_machine_cannot_train_on_is_refused_with_the_fix(monkeypatch, device, gpus, message):
    _gpus(monkeypatch, gpus)

    with pytest.raises(FedsiteError, match="--device") as refused:
        check_site_device(device)

    assert message in str(refused.value)


def test_a_refused_device_creates_no_site(monkeypatch, tmp_path):
    _gpus(monkeypatch, 0)

    with pytest.raises(FedsiteError, match="no CUDA GPU"):
        launch_in_process(tmp_path / "site-a", admin_password=ADMIN_PASSWORD, name="site-a", device="cuda")

    assert not (tmp_path / "site-a").exists()


def test_fedsite_serve_refuses_the_device_before_it_creates_the_site(monkeypatch, tmp_path, capsys):
    _gpus(monkeypatch, 0)
    monkeypatch.setenv("FEDSITE_ADMIN_PASSWORD", ADMIN_PASSWORD)

    status = fedsite_main(["serve", "--name", "site-a", "--data-dir", str(tmp_path / "site-a"), "--port", "1",
                           "--device", "cuda:0"])

    assert status != 0
    assert "--device 'cuda:0': torch sees no CUDA GPU on this machine: use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "site-a").exists()

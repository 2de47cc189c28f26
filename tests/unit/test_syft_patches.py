"""The one install() of Fedsite's syft patches: checks the syft version first, applies every patch, idempotent."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

import pytest

from datasites import syft_patches
from datasites.gate import is_gate_installed
from datasites.guard import is_guard_installed
from policies import syft_patches as client_patches
from policies.syft_patches import SYFT_VERSION, SyftVersionError, check_syft_version

pytestmark = pytest.mark.unit


def test_the_patches_were_written_for_the_installed_syft() -> None:
    assert SYFT_VERSION == "0.9.5"
    assert check_syft_version() == metadata.version("syft") == SYFT_VERSION


@pytest.mark.parametrize("installed", ["0.9.6", "0.9.4", "0.9.5rc1", "1.0.0"])
def test_another_syft_version_is_refused_naming_both(installed: str) -> None:
    with pytest.raises(SyftVersionError, match=rf"^syft {installed} is installed, but Fedsite's patches to syft were "
                                              r"written for syft 0\.9\.5 .*: install syft==0\.9\.5"):
        check_syft_version(installed)


def test_install_refuses_another_syft_before_patching_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a process that has not checked yet, with another syft installed, and a patch that records its call
    applied: list[str] = []
    monkeypatch.setattr(client_patches, "_state", client_patches._State())
    monkeypatch.setattr(client_patches.metadata, "version", lambda name: "0.9.6")
    extra = client_patches.Patch("a syft attribute", "a reason", lambda: applied.append("extra"))

    # Execute / Assert
    with pytest.raises(SyftVersionError, match=r"^syft 0\.9\.6 is installed"):
        client_patches.install(patches=(extra,))
    assert applied == []


def test_install_is_idempotent_and_leaves_every_patch_in_place() -> None:
    syft_patches.install()
    syft_patches.install()

    import syft.types.syft_object as syft_object_module
    from syft.server.server import Server

    from datasites.syft_speedups import attach_attributes

    assert is_gate_installed() and is_guard_installed()
    assert getattr(Server.handle_api_call_with_unsigned_result, "__wrapped__", None) is not None
    assert getattr(Server.handle_api_call_with_unsigned_result.__wrapped__, "__fedsite_gate__", False) is False
    assert syft_object_module.attach_attribute_to_syft_object is attach_attributes
    relays = [f for f in logging.getLogger("syft.server.server").filters if type(f).__name__ == "_HiddenErrorRelay"]
    assert len(relays) == 1


def test_every_patch_is_listed_once_with_a_reason() -> None:
    targets = [patch.target for patch in syft_patches.PATCHES]
    assert len(targets) == len(set(targets)) == len(client_patches.CLIENT_PATCHES) + len(syft_patches.SITE_PATCHES)
    assert all(patch.reason and "\n" not in patch.reason for patch in syft_patches.PATCHES)
    assert any("ActionService._user_code_execute" in t for t in targets)
    assert any("Server.handle_api_call_with_unsigned_result" in t for t in targets)


def test_syft_logs_are_silent_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_patches._state, "verbose", False)
    syft_patches.install()
    record = logging.LogRecord("syft.server.server", logging.CRITICAL, __file__, 1, "Hash of the signing key", None, None)
    relay = next(f for f in logging.getLogger("syft.server.server").filters if type(f).__name__ == "_HiddenErrorRelay")

    assert logging.getLogger("syft").getEffectiveLevel() > logging.CRITICAL
    assert relay.filter(record) is False
    syft_patches.install(verbose=True)
    assert relay.filter(record) is True
    assert logging.getLogger("syft").level == logging.NOTSET
    syft_patches.install(verbose=False)
    assert logging.getLogger("syft").getEffectiveLevel() > logging.CRITICAL


def test_fedsite_commands_that_talk_to_syft_refuse_another_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fedsite.cli import main

    monkeypatch.setattr(client_patches, "_state", client_patches._State())
    monkeypatch.setattr(client_patches.metadata, "version", lambda name: "0.10.0")

    code = main(["admin", "requests", "--data-dir", str(tmp_path), "--verbose"])

    assert code == 2
    assert capsys.readouterr().err.startswith("fedsite: error: syft 0.10.0 is installed, but Fedsite's patches to "
                                              "syft were written for syft 0.9.5")


@pytest.mark.parametrize("argv", [["serve", "--data-dir", "d", "--port", "1"], ["demo"],
                                  ["admin", "show", "abcdef", "--data-dir", "d"]])
def test_verbose_is_a_flag_of_the_commands_that_print_syft_noise(argv: list[str]) -> None:
    from fedsite.cli import build_parser

    assert build_parser().parse_args(argv).verbose is False
    assert build_parser().parse_args([*argv, "--verbose"]).verbose is True

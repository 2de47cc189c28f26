"""The import graph DESIGN.md draws: ``models`` imports nothing of ours, the trusted side nothing of ``researcher``.

Each check runs in a fresh interpreter (this one has imported everything already) and imports every module
of the packages it names, found with ``pkgutil.walk_packages``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

OURS = ("models", "policies", "datasites", "researcher", "fedsite", "bench", "tests")

PROBE = """
import importlib, json, pkgutil, sys
packages = [importlib.import_module(name) for name in {packages!r}]
for package in packages:
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in {ours!r})))
"""


def _loaded_after_importing(*packages: str) -> set[str]:
    """Our modules in ``sys.modules`` after importing every module of ``packages`` in a fresh interpreter."""
    probe = PROBE.format(packages=packages, ours=OURS)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=600,
                          cwd=REPO)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_trusted_packages_and_models_import_nothing_of_the_researchers() -> None:
    # Execute
    loaded = _loaded_after_importing("policies", "datasites", "models")

    # Assert: all of them were imported (the walk found them), and no researcher module came along
    assert {"policies.site_runtime", "policies.dp.round", "datasites.server", "models.build"} <= loaded
    assert sorted(name for name in loaded if name.split(".")[0] == "researcher") == []


def test_models_imports_nothing_else_of_ours() -> None:
    loaded = _loaded_after_importing("models")

    assert "models.public_start" in loaded
    assert {name.split(".")[0] for name in loaded} == {"models"}


def test_a_model_spec_parses_without_loading_torch() -> None:
    probe = ("import sys; from models import ModelSpec; "
             "spec = ModelSpec.parse({'name': 'all-MiniLM-L6-v2', 'trainable': {'kind': 'head'}}); "
             "print(spec.trainable.kind, 'torch' in sys.modules)")

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300,
                          cwd=REPO)

    assert done.stdout.strip() == "head False"

"""docs/security.md stays true to the gate: every allowlisted path, with the reason the code gives, and no other."""

from __future__ import annotations

import re

import pytest

from datasites.gate import ALLOWLIST
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_the_security_page_lists_exactly_the_allowlist_with_its_reasons() -> None:
    page = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    table = page.split("### The allowlist", 1)[1].split("\n## ", 1)[0]

    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| (.+?) \|", table, flags=re.MULTILINE))

    assert rows == {path: rule.reason for path, rule in ALLOWLIST.items()}

"""The one request-id resolver: a full id or a unique prefix of >= 6 hex digits, dashes and case ignored."""

from __future__ import annotations

import pytest

from datasites.errors import FedsiteError
from datasites.request_ids import request_prefix, resolve_request_id

pytestmark = pytest.mark.unit

IDS = ["abcdef01" + "0" * 24, "abcdef02" + "1" * 24, "12345678" + "2" * 24]


def _resolve(given: str) -> str:
    return resolve_request_id(given, IDS, lambda request_id: request_id)


@pytest.mark.parametrize(("given", "expected"), [
    ("ABCDEF01", IDS[0]), ("abcd-ef02", IDS[1]), ("123456", IDS[2]),
    ("12345678-2222-2222-2222-222222222222", IDS[2]),
])
def test_a_unique_prefix_names_its_request(given: str, expected: str) -> None:
    assert _resolve(given) == expected


@pytest.mark.parametrize("given", ["abcde", "abcdeg", "run-0011aa", ""])
def test_a_short_or_non_hex_id_is_refused_before_any_lookup(given: str) -> None:
    with pytest.raises(FedsiteError, match=rf"^request id {given!r} must be at least 6 hex digits"):
        request_prefix(given)
    with pytest.raises(FedsiteError, match=r"must be at least 6 hex digits"):
        resolve_request_id(given, IDS, lambda request_id: pytest.fail("looked up a malformed id"))


def test_an_ambiguous_prefix_names_every_match() -> None:
    with pytest.raises(FedsiteError, match=rf"^request id 'abcdef' is ambiguous, it matches 2 requests "
                                           rf"\({IDS[0]}, {IDS[1]}\): give more digits$"):
        _resolve("ABC-DEF")


def test_no_match_names_the_command_that_lists_them() -> None:
    with pytest.raises(FedsiteError, match=r"^no live approval 'fedcba' on this site: list them with "
                                           r"`fedsite admin audit`$"):
        resolve_request_id("fedcba", IDS, lambda request_id: request_id, what="live approval",
                           listed_by="`fedsite admin audit`")

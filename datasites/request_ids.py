"""Request ids as an admin types them: a full id or a unique prefix, resolved the same way everywhere.

``fedsite admin show | approve | deny | revoke``, the review queue and the demo name a request by its
syft id (32 hex digits, dashes allowed) or a prefix of at least ``MIN_PREFIX`` digits. A prefix that
matches nothing, or more than one request, is refused with every match named: an admin never acts on
a request other than the one meant.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from datasites.errors import FedsiteError

MIN_PREFIX = 6
SHORT_ID = 12  # how many digits of an id the admin's tables show
T = TypeVar("T")


def request_prefix(given: str) -> str:
    """A request id or prefix, normalised (lowercase, no dashes); checked before any connection is made."""
    prefix = given.replace("-", "").lower()
    if len(prefix) < MIN_PREFIX or any(c not in string.hexdigits for c in prefix):
        raise FedsiteError(f"request id {given!r} must be at least {MIN_PREFIX} hex digits: "
                           "copy it from `fedsite admin requests`")
    return prefix


def resolve_request_id(given: str, candidates: Iterable[T], id_of: Callable[[T], str], *, what: str = "request",
                       listed_by: str = "`fedsite admin requests`") -> T:
    """The one candidate whose id starts with the prefix ``given``; refuses none or several, naming the fix."""
    prefix = request_prefix(given)
    matches = [c for c in candidates if id_of(c).replace("-", "").lower().startswith(prefix)]
    if not matches:
        raise FedsiteError(f"no {what} {prefix!r} on this site: list them with {listed_by}")
    if len(matches) > 1:
        ids = ", ".join(id_of(c) for c in matches)
        raise FedsiteError(f"{what} id {prefix!r} is ambiguous, it matches {len(matches)} {what}s ({ids}): "
                           "give more digits")
    return matches[0]


def find_request(client: Any, given: str) -> Any:
    """The summary (``review_queue.RequestSummary``) of the one request on the site that ``given`` names."""
    from datasites.review_queue import list_requests

    return resolve_request_id(given, list_requests(client), lambda summary: summary.request_id)


def pending_request(client: Any, given: str) -> Any:
    """Only a pending request may be decided; a decided one is never silently decided again."""
    summary = find_request(client, given)
    if summary.status != "pending":
        raise FedsiteError(f"request {summary.request_id[:SHORT_ID]} is already {summary.status}: "
                           "only pending requests can be approved or denied")
    return summary


__all__ = ["MIN_PREFIX", "SHORT_ID", "find_request", "pending_request", "request_prefix", "resolve_request_id"]

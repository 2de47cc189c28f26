"""Peer pins: what this site's admin trusts in a secure sum, the roster checks, and `fedsite admin peers`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from datasites.sitedir import SiteDir
from fedsite.cli import main
from policies.identity import create_identity_key, identity_public_hex
from policies.peers import PEERS_FILE, PeerPinError, PeerPins, RosterEntryStatus, check_peer_key
from policies.secagg.roster import Roster

pytestmark = pytest.mark.unit

KEY_B = Ed25519PrivateKey.from_private_bytes(b"b" * 32).public_key().public_bytes_raw().hex()
KEY_C = Ed25519PrivateKey.from_private_bytes(b"c" * 32).public_key().public_bytes_raw().hex()
KEY_D = Ed25519PrivateKey.from_private_bytes(b"d" * 32).public_key().public_bytes_raw().hex()
# y = 2 has no x on edwards25519: 32 bytes that are not a point of the curve
NOT_A_POINT = "02" + "00" * 31
# the neutral element (y = 1): a point of order 1, under which (R = it, S = 0) verifies for every message
SMALL_ORDER = "01" + "00" * 31


def re_repr(value: object) -> str:
    """``repr(value)`` as a regular expression."""
    return re.escape(repr(value))


def fingerprint(key_hex: str) -> str:
    """The first 16 hex digits of the key's SHA-256 (policies.identity.key_fingerprint), computed here."""
    return hashlib.sha256(bytes.fromhex(key_hex)).hexdigest()[:16]


@pytest.fixture()
def pins(tmp_path: Path) -> PeerPins:
    create_identity_key(tmp_path)
    return PeerPins(tmp_path, own_name="site-a")


def own_key(pins: PeerPins) -> str:
    return identity_public_hex(pins.data_dir)


def roster(*entries: tuple[str, str]) -> Roster:
    return Roster.of((name, bytes.fromhex(key)) for name, key in entries)


def peers_file(pins: PeerPins) -> bytes | None:
    return pins.path.read_bytes() if pins.path.exists() else None


# --- add / remove / threshold round trips --------------------------------------------------------


def test_a_new_site_pins_nobody_with_the_least_threshold(pins: PeerPins) -> None:
    # Execute
    loaded = pins.load()

    # Assert
    assert (loaded.own_name, loaded.own_key, dict(loaded.peers), loaded.min_threshold) == ("site-a", own_key(pins),
                                                                                          {}, 2)
    assert not pins.path.exists()


def test_add_pins_a_peer_durably_owner_only(pins: PeerPins) -> None:
    # Execute
    pins.add("site-c", KEY_C)
    returned = pins.add("site-b", KEY_B)
    reloaded = PeerPins(pins.data_dir, own_name="site-a").load()

    # Assert
    assert dict(returned.peers) == dict(reloaded.peers) == {"site-b": KEY_B, "site-c": KEY_C}
    assert json.loads(pins.path.read_text()) == {"peers": {"site-b": KEY_B, "site-c": KEY_C}, "min_threshold": 2}
    assert pins.path.stat().st_mode & 0o777 == 0o600
    assert pins.path == pins.data_dir / PEERS_FILE


def test_adding_the_same_pin_again_changes_nothing(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)

    # Execute
    again = pins.add("site-b", KEY_B)

    # Assert
    assert dict(again.peers) == {"site-b": KEY_B}


def test_remove_unpins_only_that_peer(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    pins.add("site-c", KEY_C)
    pins.set_min_threshold(3)

    # Execute
    returned = pins.remove("site-b")

    # Assert
    assert dict(returned.peers) == {"site-c": KEY_C}
    assert json.loads(pins.path.read_text()) == {"peers": {"site-c": KEY_C}, "min_threshold": 3}


def test_threshold_round_trip_keeps_the_pins(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)

    # Execute
    returned = pins.set_min_threshold(3)
    reloaded = PeerPins(pins.data_dir, own_name="site-a").load()

    # Assert
    assert returned.min_threshold == reloaded.min_threshold == 3
    assert dict(reloaded.peers) == {"site-b": KEY_B}


# --- refusals --------------------------------------------------------------------------------------


def test_add_refuses_this_sites_own_name(pins: PeerPins) -> None:
    with pytest.raises(PeerPinError, match=rf"site-a / {fingerprint(KEY_B)} is this site itself: its own key is "
                                           "always trusted"):
        pins.add("site-a", KEY_B)
    assert peers_file(pins) is None


def test_add_refuses_this_sites_own_key_under_another_name(pins: PeerPins) -> None:
    with pytest.raises(PeerPinError, match=rf"site-b / {fingerprint(own_key(pins))} is this site itself"):
        pins.add("site-b", own_key(pins))
    assert peers_file(pins) is None


@pytest.mark.parametrize("key", ["zz", KEY_B[:-1], KEY_B + "0", KEY_B.upper(), " " + KEY_B[1:], 42, None])
def test_add_refuses_a_key_that_is_not_64_lowercase_hex_digits(pins: PeerPins, key: object) -> None:
    with pytest.raises(PeerPinError, match=r"a peer key is 64 lowercase hex digits \(its admin's `fedsite admin "
                                           rf"identity`\), got {re_repr(key)}"):
        pins.add("site-b", key)  # type: ignore[arg-type]
    assert peers_file(pins) is None


@pytest.mark.parametrize(("key", "why"), [
    (NOT_A_POINT, "not an Ed25519 public key: no canonical curve point has this encoding"),
    (SMALL_ORDER, "a small-order Ed25519 point is not a usable public key"),
])
def test_add_refuses_32_bytes_that_are_not_a_usable_ed25519_key(pins: PeerPins, key: str, why: str) -> None:
    with pytest.raises(PeerPinError, match=rf"^{key[:16]}\.\.\. is refused \({why}\): ask the peer's admin for its key "
                                           "again$"):
        pins.add("site-b", key)
    assert peers_file(pins) is None


@pytest.mark.parametrize("name", ["Site-B", "site b", "-site", "", "../site-b", 7])
def test_add_refuses_an_invalid_peer_name(pins: PeerPins, name: object) -> None:
    with pytest.raises(PeerPinError, match=rf"peer name {re_repr(name)} is invalid: use the peer's site name"):
        pins.add(name, KEY_B)  # type: ignore[arg-type]
    assert peers_file(pins) is None


def test_add_refuses_a_second_key_for_a_pinned_name(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    before = peers_file(pins)

    # Execute / Assert
    with pytest.raises(PeerPinError, match=rf"site-b is already pinned to {fingerprint(KEY_B)}: remove it first "
                                           r"\(`fedsite admin peers remove site-b`\) if its key really changed"):
        pins.add("site-b", KEY_C)
    assert peers_file(pins) == before


def test_add_refuses_a_key_already_pinned_for_another_name(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    before = peers_file(pins)

    # Execute / Assert
    with pytest.raises(PeerPinError, match=rf"key {fingerprint(KEY_B)} is already pinned for site-b: one key, one site"):
        pins.add("site-c", KEY_B)
    assert peers_file(pins) == before


def test_remove_refuses_a_name_that_is_not_pinned(pins: PeerPins) -> None:
    # Prepare
    with pytest.raises(PeerPinError, match=r"'site-b' is not pinned here \(pinned: none\): nothing changed"):
        pins.remove("site-b")
    pins.add("site-c", KEY_C)
    before = peers_file(pins)

    # Execute / Assert
    with pytest.raises(PeerPinError, match=r"'site-b' is not pinned here \(pinned: site-c\): nothing changed"):
        pins.remove("site-b")
    assert peers_file(pins) == before


@pytest.mark.parametrize("threshold", [1, 0, -2, True, 2.0, "3", None])
def test_threshold_refuses_less_than_two_or_a_non_int(pins: PeerPins, threshold: object) -> None:
    with pytest.raises(PeerPinError, match=r"the minimum secure-sum threshold must be an int >= 2 \(a sum of one "
                                           rf"input reveals it\), got {re_repr(threshold)}"):
        pins.set_min_threshold(threshold)  # type: ignore[arg-type]
    assert peers_file(pins) is None


@pytest.mark.parametrize(("document", "message"), [
    ({"peers": {"site-b": "xyz"}}, r"a peer key is 64 lowercase hex digits .* got 'xyz'"),
    ({"peers": {}, "min_threshold": 1}, r"the minimum secure-sum threshold must be an int >= 2 .* got 1"),
    ({"peers": {}, "min_threshold": True}, r"the minimum secure-sum threshold must be an int >= 2 .* got True"),
])
def test_load_refuses_an_edited_peers_file(pins: PeerPins, document: dict[str, object], message: str) -> None:
    # Prepare
    pins.path.write_text(json.dumps(document))

    # Execute / Assert
    with pytest.raises(PeerPinError, match=message):
        pins.load()


def test_check_peer_key_returns_a_valid_key_unchanged() -> None:
    assert check_peer_key(KEY_B) == KEY_B


# --- the roster against the pins ------------------------------------------------------------------


def test_a_fully_pinned_roster_has_no_problem(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    pins.add("site-c", KEY_C)
    federation = pins.load()

    # Execute
    problems = federation.roster_problems(roster(("site-a", own_key(pins)), ("site-b", KEY_B), ("site-c", KEY_C)), 2)

    # Assert
    assert problems == []


def test_a_roster_entry_that_is_not_pinned_is_a_problem(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)

    # Execute
    problems = pins.load().roster_problems(
        roster(("site-a", own_key(pins)), ("site-b", KEY_B), ("site-c", KEY_C)), 2)

    # Assert
    assert problems == [f"roster entry site-c (key {fingerprint(KEY_C)}) is not pinned here: check its key with its "
                        "admin, then `fedsite admin peers add site-c KEY`"]


def test_a_substituted_key_for_a_pinned_peer_is_a_problem(pins: PeerPins) -> None:
    # Prepare: the researcher's roster names site-b but carries a key of its own making
    pins.add("site-b", KEY_B)

    # Execute
    problems = pins.load().roster_problems(roster(("site-a", own_key(pins)), ("site-b", KEY_D)), 2)

    # Assert
    assert problems == [f"roster entry site-b carries key {fingerprint(KEY_D)}: KEY DIFFERS from the pinned "
                        f"{fingerprint(KEY_B)} (a substituted or outdated key)"]


def test_this_sites_entry_with_another_key_is_a_problem(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)

    # Execute
    problems = pins.load().roster_problems(roster(("site-a", KEY_D), ("site-b", KEY_B)), 2)

    # Assert
    assert problems == [f"roster entry site-a carries key {fingerprint(KEY_D)}: KEY DIFFERS from this site's "
                        f"{fingerprint(own_key(pins))} (a substituted or outdated key)"]


def test_a_roster_without_this_site_is_a_problem(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    pins.add("site-c", KEY_C)

    # Execute
    problems = pins.load().roster_problems(roster(("site-b", KEY_B), ("site-c", KEY_C)), 2)

    # Assert
    assert problems == ["the roster does not list this site (site-a)"]


def test_a_threshold_below_the_minimum_is_a_problem(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    pins.add("site-c", KEY_C)
    pins.set_min_threshold(3)
    full = roster(("site-a", own_key(pins)), ("site-b", KEY_B), ("site-c", KEY_C))

    # Execute
    below, at = pins.load().roster_problems(full, 2), pins.load().roster_problems(full, 3)

    # Assert
    assert below == ["the secure-sum threshold 2 is below this site's minimum 3 (`fedsite admin peers threshold`)"]
    assert at == []


def test_every_problem_is_listed(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    pins.set_min_threshold(3)

    # Execute
    problems = pins.load().roster_problems(roster(("site-b", KEY_D), ("site-c", KEY_C)), 2)

    # Assert
    assert problems == [
        "the roster does not list this site (site-a)",
        f"roster entry site-b carries key {fingerprint(KEY_D)}: KEY DIFFERS from the pinned {fingerprint(KEY_B)} "
        "(a substituted or outdated key)",
        f"roster entry site-c (key {fingerprint(KEY_C)}) is not pinned here: check its key with its admin, then "
        "`fedsite admin peers add site-c KEY`",
        "the secure-sum threshold 2 is below this site's minimum 3 (`fedsite admin peers threshold`)",
    ]


def test_roster_status_names_each_entry(pins: PeerPins) -> None:
    # Prepare
    pins.add("site-b", KEY_B)
    pins.add("site-c", KEY_C)
    own = own_key(pins)

    # Execute
    trusted = pins.load().roster_status(roster(("site-a", own), ("site-b", KEY_B)))
    untrusted = pins.load().roster_status(roster(("site-a", KEY_D), ("site-c", KEY_B), ("site-e", KEY_C)))

    # Assert
    assert trusted == [RosterEntryStatus("site-a", fingerprint(own), "this site"),
                       RosterEntryStatus("site-b", fingerprint(KEY_B), "pinned")]
    assert untrusted == [
        RosterEntryStatus("site-a", fingerprint(KEY_D), f"KEY DIFFERS from this site's {fingerprint(own)}"),
        RosterEntryStatus("site-c", fingerprint(KEY_B), f"KEY DIFFERS from the pinned {fingerprint(KEY_C)}"),
        RosterEntryStatus("site-e", fingerprint(KEY_C), "NOT PINNED"),
    ]
    assert [entry.trusted for entry in trusted + untrusted] == [True, True, False, False, False]


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture()
def site(tmp_path: Path) -> SiteDir:
    site = SiteDir(tmp_path / "site-a")
    site.create(name="site-a", admin_email="admin@site-a.fedsite.org")
    return site


def peers(capsys: pytest.CaptureFixture[str], site: SiteDir, *argv: str) -> tuple[int, str, str]:
    code = main(["admin", "peers", "--data-dir", str(site.path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_add_list_remove_and_threshold(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    own = site.identity_public_hex()

    # Execute
    added = peers(capsys, site, "add", "site-b", KEY_B.upper())  # pasted in capitals: the CLI lowers it
    listed = peers(capsys, site, "list")
    raised = peers(capsys, site, "threshold", "3")
    removed = peers(capsys, site, "remove", "site-b")

    # Assert
    assert [code for code, _, _ in (added, listed, raised, removed)] == [0, 0, 0, 0]
    assert added[1] == listed[1]
    assert [line.split() for line in listed[1].splitlines()] == [
        ["site", "site-a", "(this", "site)", "key", fingerprint(own), own],
        ["pinned", "site-b", "key", fingerprint(KEY_B), KEY_B],
        ["minimum", "secure-sum", "threshold:", "2"],
    ]
    assert raised[1].splitlines()[-1] == "minimum secure-sum threshold: 3"
    assert removed[1].splitlines()[1:] == [
        "no peers pinned: every plan is refused until you pin the other sites (`fedsite admin peers add NAME KEY`)",
        "minimum secure-sum threshold: 3",
    ]
    assert json.loads((site.path / PEERS_FILE).read_text()) == {"peers": {}, "min_threshold": 3}


def test_cli_refuses_a_bad_key_with_exit_code_2(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code, out, err = peers(capsys, site, "add", "site-b", "zz")

    # Assert
    assert (code, out) == (2, "")
    assert err == ("fedsite: error: a peer key is 64 lowercase hex digits (its admin's `fedsite admin identity`), "
                   "got 'zz'\n")
    assert not (site.path / PEERS_FILE).exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["remove", "site-b"], "fedsite: error: 'site-b' is not pinned here (pinned: none): nothing changed\n"),
    (["threshold", "1"], "fedsite: error: the minimum secure-sum threshold must be an int >= 2 (a sum of one input "
                         "reveals it), got 1\n"),
    (["add", "site-a", KEY_B], f"fedsite: error: site-a / {fingerprint(KEY_B)} is this site itself: its own key is "
                               "always trusted\n"),
])
def test_cli_refuses_other_bad_requests_with_exit_code_2(site: SiteDir, capsys: pytest.CaptureFixture[str],
                                                         argv: list[str], message: str) -> None:
    code, _, err = peers(capsys, site, *argv)

    assert (code, err) == (2, message)
    assert not (site.path / PEERS_FILE).exists()


def test_cli_refuses_a_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["admin", "peers", "--data-dir", str(tmp_path / "nowhere"), "list"])

    assert code == 2
    assert "does not exist: start the site once with" in capsys.readouterr().err


def test_cli_takes_the_data_dir_after_the_subcommand(site: SiteDir, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["admin", "peers", "add", "site-b", KEY_B, "--data-dir", str(site.path)])

    assert code == 0
    assert json.loads((site.path / PEERS_FILE).read_text())["peers"] == {"site-b": KEY_B}


# The encodings of Ed25519's small-order points and non-canonical forms, as libsodium's blocklist lists them.
BLOCKLIST = [
    "0100000000000000000000000000000000000000000000000000000000000000",  # the identity
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4, other sign
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8, other sign
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8, other sign
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1: order 2
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p: not canonical
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p + 1: not canonical
]


@pytest.mark.parametrize("encoding", BLOCKLIST)
def test_small_order_and_non_canonical_points_are_not_public_keys(encoding: str) -> None:
    from policies.identity import check_ed25519_public_key
    from policies.secagg import SecAggConfigError
    from policies.secagg.roster import RosterEntry

    with pytest.raises(ValueError, match=r"^(a small-order Ed25519 point|not an Ed25519 public key)"):
        check_ed25519_public_key(bytes.fromhex(encoding))
    with pytest.raises(SecAggConfigError, match=r"^the identity key of site-b is refused: "):
        RosterEntry("site-b", bytes.fromhex(encoding))


def test_generated_keys_are_public_keys() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from policies.identity import check_ed25519_public_key

    keys = [Ed25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(64)]

    assert [check_ed25519_public_key(key) for key in keys] == keys

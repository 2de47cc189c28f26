"""The speed fix to syft's result walk changes nothing but its speed."""

from __future__ import annotations

from typing import Any

import pytest
import syft.types.syft_object as syft_object_module
from syft.types.result import Ok
from syft.types.syft_object import SYFT_OBJECT_VERSION_1, SyftObject

from datasites.syft_speedups import attach_attributes, install_syft_speedups, syft_walk

pytestmark = pytest.mark.unit

ORIGINAL = syft_walk()  # syft's own even where a site was launched before this module was imported
STAMP = {"syft_server_location": "a server id", "syft_client_verify_key": "a verify key"}


class FedsiteTestBox(SyftObject):
    __canonical_name__ = "FedsiteTestBox"
    __version__ = SYFT_OBJECT_VERSION_1

    payload: bytes = b""
    text: str = ""
    children: list[Any] = []
    named: dict[str, Any] = {}


def _tree() -> Any:
    """A result as a service returns it: syft objects in containers, with text and bytes in their fields."""
    leaf = FedsiteTestBox(payload=b"\x00" * 1000, text="a review")
    inner = FedsiteTestBox(children=[leaf, "text", b"bytes", 3, [FedsiteTestBox()]],
                           named={"leaf": FedsiteTestBox(text="x")})
    return [inner, {"k": FedsiteTestBox(payload=b"\x01" * 10)}, bytearray(b"raw"), "plain text"]


def _stamps(node: Any) -> list[tuple[Any, Any]]:
    """(server location, verify key) of every syft object in the tree, in a fixed order."""
    found: list[tuple[Any, Any]] = []

    def walk(value: Any) -> None:
        if isinstance(value, Ok):
            walk(value.ok())
        elif isinstance(value, FedsiteTestBox):
            found.append((value.syft_server_location, value.syft_client_verify_key))
            for child in (value.children, value.named):
                walk(child)
        elif isinstance(value, dict):
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    walk(node)
    return found


@pytest.mark.parametrize("wrap", [lambda tree: tree, lambda tree: Ok(tree[0]), lambda tree: tree[0],
                                  lambda tree: {"result": tree[0]}])
def test_it_stamps_exactly_the_objects_syft_stamps(wrap: Any) -> None:
    assert ORIGINAL.__module__ == "syft.types.syft_object"  # syft's own, captured before any site installed ours
    ours, theirs = _tree(), _tree()
    assert set(_stamps(ours)) == {(None, None)}

    attach_attributes(result=wrap(ours), attr_dict=STAMP)
    ORIGINAL(result=wrap(theirs), attr_dict=STAMP)

    assert _stamps(ours) == _stamps(theirs)
    assert _stamps(ours).count(("a server id", "a verify key")) >= 3  # the walk reached nested objects


def test_installing_replaces_both_bindings_of_syft_s_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    import syft.service.service as service_module

    monkeypatch.setattr(service_module, "attach_attribute_to_syft_object", ORIGINAL)  # as a fresh process has it
    monkeypatch.setattr(syft_object_module, "attach_attribute_to_syft_object", ORIGINAL)

    install_syft_speedups()
    install_syft_speedups()  # idempotent

    assert service_module.attach_attribute_to_syft_object is attach_attributes  # what every service call uses
    assert syft_object_module.attach_attribute_to_syft_object is attach_attributes

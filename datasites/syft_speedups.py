"""A behaviour-preserving speed fix to syft 0.9.5 that every Fedsite datasite installs.

After every service call, syft walks the result to stamp each syft object in it with the server's
id and the caller's key (``syft.types.syft_object.attach_attribute_to_syft_object``). It treats a
``str`` or ``bytes`` like any other sequence and visits it element by element, although a character
or a byte can never be a syft object. A site reads its private partition from blob storage several
times in every execution of approved code (syft loads the asset to check the input policy, to split
the private and mock twins, and to flatten the arguments), and each read's result carries the
partition's bytes: with 1,000 reviews (0.84 MB) the walks cost ~0.9 s of CPU per call at each site,
about half of each secure-sum stage's time over HTTP (profiled with py-spy; docs/syft.md has the
same walk on an 88 MB state dict).

``attach_attributes`` below does exactly what syft's function does and skips only those scalar
sequences, whose elements the original inspects and leaves alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

_TEXT_AND_BYTES = (str, bytes, bytearray, memoryview)
_syft_walk: Callable[..., None] | None = None  # syft's own, kept by the first install


def attach_attributes(result: Any, attr_dict: dict[str, Any]) -> None:
    """Set ``attr_dict`` on every syft object inside ``result`` (syft's walk, minus str and bytes)."""
    from syft.types.result import Err, Ok
    from syft.types.syft_object import SyftBaseObject

    def walk(value: Any) -> None:
        if isinstance(value, _TEXT_AND_BYTES):
            return
        iterator: Any
        if isinstance(value, Ok):
            iterator = (value.ok(),)
        elif isinstance(value, Err):
            iterator = (value.err(),)
        elif isinstance(value, Mapping):
            iterator = value.values()
        elif isinstance(value, Sequence):
            iterator = value
        else:
            iterator = (value,)
        for item in iterator:
            if isinstance(item, SyftBaseObject):
                for name, attribute in attr_dict.items():
                    setattr(item, name, attribute)
                for field in type(item).model_fields:
                    walk(getattr(item, field))

    walk(result)


def install_syft_speedups() -> None:
    """Make syft's service layer use ``attach_attributes`` (and any other caller of syft's walk); idempotent."""
    import syft.service.service as service_module
    import syft.types.syft_object as syft_object_module

    global _syft_walk
    if _syft_walk is None and syft_object_module.attach_attribute_to_syft_object is not attach_attributes:
        _syft_walk = syft_object_module.attach_attribute_to_syft_object
    service_module.attach_attribute_to_syft_object = attach_attributes
    syft_object_module.attach_attribute_to_syft_object = attach_attributes


def syft_walk() -> Callable[..., None]:
    """syft's own walk, whether or not a site in this process has installed ours since (to compare, or undo)."""
    import syft.types.syft_object as syft_object_module

    return _syft_walk or syft_object_module.attach_attribute_to_syft_object


__all__ = ["attach_attributes", "install_syft_speedups", "syft_walk"]

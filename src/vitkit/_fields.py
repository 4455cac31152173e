"""Values from untrusted files checked against a dataclass field's declared type.

`ViTConfig` (config.json) and the training `Recipe` (YAML) both take their values from files a
user did not write by hand, so both refuse a value of the wrong type instead of casting it:
2.7 layers is not 2 layers, JSON `true` is not 1, "12" is not a depth. This is the one checker
both use; each names the field and the file in its own error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vitkit.limits import is_finite, is_int


def field_kinds(cls: type, *, strings: tuple[str, ...] = ()) -> dict[str, str]:
    """{field: declared type as text} of a dataclass; the `strings` aliases and `Literal[...]`
    (a choice among names, checked by the class itself) count as "str"."""
    kinds = {}
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        kinds[f.name] = "str" if kind in strings or kind.startswith("Literal[") else kind
    return kinds


def checked(value: Any, kind: str, *, numeric_strings: bool = False) -> Any:
    """`value` as the declared `kind` ("bool", "int", "float", "str", "dict[...]",
    "tuple[float, ...]", each perhaps "| None"); `ValueError("must be ...")` otherwise.

    `numeric_strings` accepts "1e-3" for a float (YAML reads that spelling as text)."""
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"needs a value ({base})")

    def number(v: Any) -> float:
        if numeric_strings and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ValueError("must be a number") from None
        if not is_finite(v):
            raise ValueError("must be a finite number")
        return float(v)

    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if base == "int":
        if not is_int(value):
            raise ValueError("must be a whole number")
        return int(value)
    if base == "float":
        return number(value)
    if base == "str":
        if not isinstance(value, str):
            raise ValueError("must be text")
        return value
    if base.startswith("dict"):
        names = base.startswith("dict[str")
        if not isinstance(value, dict) or (names and not all(isinstance(k, str) for k in value)):
            raise ValueError(
                "must be a mapping of names to values" if names else "must be a mapping"
            )
        return value
    if base.startswith("tuple[float"):
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of numbers")
        return tuple(number(v) for v in value)
    raise TypeError(f"no check for fields of type {kind!r}")  # a new field type: add it here

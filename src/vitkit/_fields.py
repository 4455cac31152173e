"""Field rules declared once, on the dataclass, and the one checker that applies them.

`ViTConfig` (config.json), the training `Recipe` (YAML) and `ImageProcessor`
(preprocessor_config.json) take their values from files a user did not write by hand. A field's
type says what it holds and is never cast: 2.7 layers is not 2 layers, JSON `true` is not 1, "12"
is not a depth. A `Literal` type lists the choices; `In` inside `Annotated` bounds a number, or
each number of a list:

    depth: Annotated[int, POSITIVE] = 12
    betas: Annotated[tuple[float, float], In("[0, 1)")] = (0.9, 0.999)
    stem_strides: tuple[Literal[1, 2], ...] = ()

`problems(obj)` checks every field, stores the normalised value (lists become tuples, ints in a
float field floats) and returns one message per bad field naming it, its value and what it must
be. Rules between fields, and the size limits of `vitkit.limits`, stay with each class.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal, Union

from vitkit import limits
from vitkit.errors import ConfigError
from vitkit.limits import is_finite, is_int


@dataclasses.dataclass(frozen=True)
class In:
    """An interval written as in mathematics, "[0, 1)" or "(0, inf)". `ordered`: a [low, high]
    pair must also have low <= high. `hint` ends the message ("e.g. 0.999")."""

    interval: str
    hint: str = ""
    ordered: bool = False

    def holds(self, x: float) -> bool:
        low, high = (float(end) for end in self.interval[1:-1].split(","))
        above = x > low if self.interval[0] == "(" else x >= low
        return above and (x < high if self.interval[-1] == ")" else x <= high)

    def words(self) -> str:
        low, high = (end.strip() for end in self.interval[1:-1].split(","))
        if high != "inf":
            return f"in {self.interval}"
        if self.interval[0] == "[":
            return f">= {low}"
        return "positive" if low == "0" else f"> {low}"


POSITIVE = In("(0, inf)")
AT_LEAST_0 = In("[0, inf)")
RATE = In("[0, 1)")  # dropout, label smoothing: a probability that must leave something


@dataclasses.dataclass(frozen=True)
class _Rule:
    kinds: tuple[Any, ...]  # the declared type, or the members of a union but None
    optional: bool
    bound: In | None


@functools.cache
def _rules(cls: type) -> dict[str, _Rule]:
    hints = typing.get_type_hints(cls, include_extras=True)
    rules = {}
    for f in dataclasses.fields(cls):
        kind, bound = hints[f.name], None
        if typing.get_origin(kind) is Annotated:
            kind, *meta = typing.get_args(kind)
            bound = next((m for m in meta if isinstance(m, In)), None)
        union = typing.get_origin(kind) in (Union, types.UnionType)
        members = typing.get_args(kind) if union else (kind,)
        kinds = tuple(k for k in members if k is not type(None))
        for k in kinds:
            _noun(k)  # a type nobody checks fails on first use, not on a user's file
        rules[f.name] = _Rule(kinds, len(kinds) < len(members), bound)
    return rules


def problems(obj: Any, *, numeric_strings: bool = False) -> list[str]:
    """Check every field of the dataclass `obj` against its declaration, store the normalised
    values, and return what is wrong (nothing: an empty list). `numeric_strings` accepts "1e-3"
    for a number (YAML reads that spelling as text)."""
    found = []
    for name, rule in _rules(type(obj)).items():
        value = getattr(obj, name)
        if value is None and rule.optional:
            continue
        typed = False
        for kind in rule.kinds:
            try:
                normal = _as(value, kind, numeric_strings)
            except ValueError:
                continue
            typed = True
            if rule.bound is None or _within(normal, rule.bound):
                setattr(obj, name, normal)
                break
        else:
            found.append(_message(name, value, rule, typed))
    return found


def known(cls: type, data: Any, what: str, *, source: str = "", noun: str = "field",
          ignore: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """The entries of the mapping `data` that are fields of dataclass `cls`; a `ConfigError`
    (naming `source`, listing the fields) if `data` is no mapping or has another key but
    `ignore`."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}a {what} needs a mapping of {noun}s, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names and k not in ignore)
    if unknown:
        raise ConfigError(f"{where}unknown {what} {noun}(s) {unknown}; known {noun}s: "
                          f"{', '.join(sorted(names))}")  # fmt: skip
    return {k: v for k, v in data.items() if k in names}


def _as(value: Any, kind: Any, numeric_strings: bool) -> Any:
    """`value` as a `kind`, never cast; ValueError when it is not one."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        for choice in typing.get_args(kind):
            if type(value) is type(choice) and value == choice:
                return choice
    elif origin is tuple:
        args = typing.get_args(kind)
        if isinstance(value, list | tuple) and (args[-1] is Ellipsis or len(value) == len(args)):
            return tuple(_as(v, args[0], numeric_strings) for v in value)
    elif origin is dict:
        names = typing.get_args(kind)[0] is str
        if isinstance(value, dict) and (not names or all(isinstance(k, str) for k in value)):
            return value
    elif kind is bool or kind is str:
        if isinstance(value, kind):
            return value
    elif kind is int:
        if is_int(value):
            return int(value)
    elif kind is float:
        try:
            number = float(value) if numeric_strings and isinstance(value, str) else value
            if is_finite(number):
                return float(number)
        except (ValueError, OverflowError):
            pass
    raise ValueError(kind)


def _within(value: Any, bound: In) -> bool:
    if isinstance(value, tuple):
        in_order = not (bound.ordered and len(value) == 2 and value[0] > value[1])
        return in_order and all(bound.holds(v) for v in value)
    return bound.holds(value)


def _message(name: str, value: Any, rule: _Rule, typed: bool) -> str:
    hint = f", {rule.bound.hint}" if rule.bound and rule.bound.hint else ""
    if any(typing.get_origin(k) is tuple for k in rule.kinds):  # a list: say all it must be
        what = " or ".join(_noun(k, bound=rule.bound) for k in rule.kinds)
        shown = list(value) if isinstance(value, tuple) else value
        return f"{name} must be {what}{hint}, got {shown!r}"
    if typed and rule.bound:
        return f"{name}={value!r} must be {rule.bound.words()}{hint}"
    none = " or null" if rule.optional else ""
    return f"{name}={value!r} must be {' or '.join(_noun(k) for k in rule.kinds)}{none}"


_NOUNS = {
    bool: ("true or false", "trues or falses"),
    int: ("a whole number", "whole numbers"),
    float: ("a finite number", "numbers"),
    str: ("text", "texts"),
}


def _noun(kind: Any, *, plural: bool = False, bound: In | None = None) -> str:
    """What a value of `kind` is, in words ("a list of 2 numbers in [0, 1)")."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        order = ", low <= high" if bound and bound.ordered else ""
        return f"a list of {count}{_noun(args[0], plural=True, bound=bound)}{order}"
    if origin is Literal:
        choices = typing.get_args(kind)
        return " and ".join(f"{c}s" for c in choices) if plural else f"one of {choices}"
    if origin is dict:
        return "a mapping of names to values" if typing.get_args(kind)[0] is str else "a mapping"
    if kind not in _NOUNS:
        raise TypeError(f"no check for fields of type {kind!r}")  # a new type: add it here
    noun = _NOUNS[kind][plural]
    if bound is None:
        return noun
    if bound.words() == "positive":
        return noun.replace("a ", "a positive ", 1) if noun.startswith("a ") else "positive " + noun
    return f"{noun} {bound.words()}"


def over_limit(value: int, name: str, what: str) -> list[str]:
    """`vitkit.limits.check` as a message to collect rather than an exception."""
    try:
        limits.check(value, name, what)
    except ConfigError as exc:
        return [str(exc)]
    return []

"""refiner.settings.from_config on lists and mappings of settings blocks, optional() fields in records, require_bool."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import pytest

from refiner.errors import SettingError
from refiner.settings import from_config, optional, require_bool, require_int, to_plain


@dataclass(frozen=True)
class Leaf:
    size: int
    note: str | None = optional()

    def __post_init__(self):
        require_int("size", self.size, 1)


@dataclass(frozen=True)
class Inner:
    leaves: tuple[Leaf, ...] = ()


@dataclass(frozen=True)
class Outer:
    named: Mapping[str, Inner] = field(default_factory=dict)
    listed: tuple[Leaf, ...] | None = None
    one: Leaf = Leaf(1)


def test_lists_and_mappings_of_blocks_are_built_and_recorded_as_given():
    plain = {"named": {"a": {"leaves": [{"size": 2}, {"size": 3, "note": "x"}]}, "b": {}}, "listed": [{"size": 4}]}
    outer = from_config(Outer, plain)
    assert outer.named["a"].leaves == (Leaf(2), Leaf(3, "x")) and outer.named["b"] == Inner()
    assert outer.listed == (Leaf(4),) and from_config(Outer, {}).listed is None
    # optional fields are left out while unset: the record is the config, plus the defaults it did not name
    assert to_plain(outer) == {**plain, "named": {**plain["named"], "b": {"leaves": []}}, "one": {"size": 1}}
    assert from_config(Outer, {"named": {"a": Inner()}}).named["a"] == Inner()  # built blocks pass through


@pytest.mark.parametrize("plain,message", [
    ({"named": {"a": {"leaves": [{"size": 2}, {"sise": 3}]}}},
     "unknown setting named.a.leaves[1].sise; did you mean named.a.leaves[1].size?"),
    ({"named": {"a": {"leaves": [{"size": 2}, {"size": 0}]}}}, "named.a.leaves[1]: size must be in [1, inf], got 0"),
    ({"listed": [{"size": 0}]}, "listed[0]: size must be in [1, inf], got 0"),
    ({"listed": [{}]}, "listed[0]: .*missing 1 required positional argument: 'size'"),
    ({"listed": [3]}, "listed[0] must be a mapping of settings, got 3"),
    ({"listed": {"size": 3}}, "listed must be a list of settings"),
    ({"named": [1]}, "named must be a mapping of name -> settings"),
    ({"one": {"size": 0}}, "^size must be in"),  # a block at a fixed place names itself (not an entry)
])
def test_errors_name_the_entry_once(plain, message):
    with pytest.raises(SettingError, match=".*".join(re.escape(p) for p in message.split(".*")).replace(r"\^", "^")):
        from_config(Outer, plain)


def test_require_bool_refuses_what_is_not_a_bool():
    assert require_bool("x", True) is True and require_bool("x", False) is False
    for bad in (0, 1, "true", None):
        with pytest.raises(SettingError, match="x must be true or false"):
            require_bool("x", bad)

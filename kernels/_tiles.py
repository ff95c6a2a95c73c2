"""The one shape of every op's launch table: rules keyed by exact fields, looked up per launch, overridable.

Each op's tiles.py declares a `TileTable`: the names of the fields a launch is keyed by (for attention: precision,
head size, kernel, dropout, architecture, operand alignment) and a list of `TileRule`s, each naming the field values
it applies to. A field a rule leaves out matches every value, so one rule can serve a family of launches; exactly
one rule matches each launch the op can make (each op's launch test checks every key), so a reader finds a launch's
tile by scanning the rules for its fields. `bench/results/compile_report.md` prints attention's resolved.

    table.lookup(precision="16bit", head=64, kernel="backward", ...)   the tile, memoised per key
    with table.override(Tile(...), kernel="backward"): ...              force a tile for the matching launches
                                                                         (tuning and tests; see TileTable.override)
"""

import contextlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class TileRule:
    """The tile of every launch whose fields equal `match`'s (fields left out match any value), why it was chosen,
    and how: "timed" (fastest on a GPU under the tuner), "model" (the fewest clocks under the static speed model;
    untimed), "flex" (FlexAttention's tile for the launch, or the nearest that compiles cleanly; untimed here) or
    "fit" (the largest tile that compiles cleanly)."""

    match: Mapping[str, Any]
    tile: Any
    why: str
    chosen_by: str = "fit"

    def __post_init__(self):
        object.__setattr__(self, "match", MappingProxyType(dict(self.match)))

    def matches(self, key):
        return all(key[name] == value for name, value in self.match.items())


@dataclass
class TileTable:
    """An op's launch table: `fields` name what a launch is keyed by, `rules` give the tiles."""

    op: str
    fields: tuple
    rules: list
    _overrides: list = field(default_factory=list, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for rule in self.rules:
            unknown = set(rule.match) - set(self.fields)
            if unknown:
                raise ValueError(f"{self.op} tile rule {dict(rule.match)} names unknown fields {sorted(unknown)}")

    def rule_for(self, **key):
        """The first rule matching the launch `key` (every field named); LookupError naming the key if none."""
        self._check_key(key)
        rule = next((rule for rule in self.rules if rule.matches(key)), None)
        if rule is None:
            raise LookupError(f"no {self.op} tile for the launch ({self._describe(key)})")
        return rule

    def lookup(self, **key):
        """The tile of the launch `key`: an active override's, else its rule's. Memoised per key, since the
        launchers ask on every call."""
        memo_key = tuple(key.items())
        tile = self._memo.get(memo_key)
        if tile is None:
            self._check_key(key)
            tile = next((tile for match, tile in reversed(self._overrides) if _matches(match, key)), None)
            if tile is None:
                tile = self.rule_for(**key).tile
            self._memo[memo_key] = tile
        return tile

    @contextlib.contextmanager
    def override(self, tile, **match):
        """Within the block, every launch whose fields equal `match` (every launch when empty) gets `tile`. The
        latest override wins where several match. How the tuner times a candidate and how the CPU tests run the
        kernels at the tiles a GPU launches."""
        self._check_key(match, complete=False)
        entry = (MappingProxyType(dict(match)), tile)
        self._overrides.append(entry)
        self._memo.clear()
        try:
            yield
        finally:
            self._overrides.remove(entry)
            self._memo.clear()

    def _check_key(self, key, complete=True):
        unknown = set(key) - set(self.fields)
        missing = set(self.fields) - set(key) if complete else set()
        if unknown or missing:
            raise TypeError(f"{self.op} launch key fields are {self.fields}; got {tuple(key)}")

    def _describe(self, key):
        return ", ".join(f"{name}={key[name]!r}" for name in self.fields)


def _matches(match, key):
    return all(key.get(name) == value for name, value in match.items())

"""kernels._tiles: the launch-table shape every op shares (lookup, the miss that names its key, overrides)."""

import pytest

from kernels._tiles import TileRule, TileTable


def _table():
    return TileTable("demo", ("precision", "head", "kernel"), [
        TileRule({"precision": "16bit", "head": 64, "kernel": "forward"}, (64, 64), "exact"),
        TileRule({"precision": "16bit", "kernel": "dq"}, (128, 32), "any head"),
    ])


def test_lookup_finds_the_rule_of_the_launch():
    table = _table()
    assert table.lookup(precision="16bit", head=64, kernel="forward") == (64, 64)
    assert table.lookup(precision="16bit", head=128, kernel="dq") == (128, 32)
    assert table.rule_for(precision="16bit", head=16, kernel="dq").why == "any head"


def test_a_launch_no_rule_matches_names_its_key():
    with pytest.raises(LookupError, match="precision='fp32', head=64, kernel='forward'"):
        _table().lookup(precision="fp32", head=64, kernel="forward")


def test_keys_must_name_exactly_the_fields():
    table = _table()
    with pytest.raises(TypeError, match="fields"):
        table.lookup(precision="16bit", head=64)
    with pytest.raises(ValueError, match="unknown fields"):
        TileTable("demo", ("head",), [TileRule({"kernel": "dq"}, (1, 1), "typo")])
    with pytest.raises(TypeError, match="fields"):
        with table.override((1, 1), heads=64):
            pass


def test_override_applies_to_matching_launches_only_and_ends_with_the_block():
    table = _table()
    forward = dict(precision="16bit", head=64, kernel="forward")
    dq = dict(precision="16bit", head=64, kernel="dq")
    assert table.lookup(**dq) == (128, 32)  # memoised before the override: the override must still win
    with table.override((16, 16), kernel="dq"):
        assert table.lookup(**dq) == (16, 16)
        assert table.lookup(**forward) == (64, 64)
        with table.override((32, 32)):
            assert table.lookup(**dq) == (32, 32)  # the latest override wins
        assert table.lookup(**dq) == (16, 16)
    assert table.lookup(**dq) == (128, 32)

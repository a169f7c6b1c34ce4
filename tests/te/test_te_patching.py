"""``patched``: restore on every exit path, nesting, and the original findable while patched."""

from __future__ import annotations

import types

import pytest

from megaquant.te.patching import is_patched, original_of, patched


def _ns():
    ns = types.ModuleType("fake_te")
    ns.fn = "original"
    return ns


def test_patched_restores_after_normal_exit_and_after_an_exception():
    ns = _ns()
    with patched(ns, "fn", "p1") as previous:
        assert ns.fn == "p1" and previous == "original"
    assert ns.fn == "original" and not is_patched(ns, "fn")
    with pytest.raises(KeyError):
        with patched(ns, "fn", "p2"):
            raise KeyError("boom")
    assert ns.fn == "original" and not is_patched(ns, "fn")


def test_nested_patches_restore_level_by_level_and_keep_the_original():
    ns = _ns()
    with patched(ns, "fn", "outer") as prev_outer:
        assert original_of(ns, "fn") == "original"
        with pytest.raises(ValueError):
            with patched(ns, "fn", "inner") as prev_inner:
                assert prev_outer == "original" and prev_inner == "outer"
                assert original_of(ns, "fn") == "original"
                with patched(ns, "fn", "innermost"):
                    raise ValueError
        assert ns.fn == "outer" and original_of(ns, "fn") == "original"
    assert ns.fn == "original" and original_of(ns, "fn") == "original"


def test_repeated_patching_of_the_same_function_is_independent_each_time():
    ns = _ns()
    for i in range(3):
        with patched(ns, "fn", f"p{i}") as previous:
            assert previous == "original" and original_of(ns, "fn") == "original"
    assert ns.fn == "original"


def test_patching_a_missing_attribute_is_refused():
    with pytest.raises(AttributeError, match="no 'nope'"):
        with patched(_ns(), "nope", 1):
            pass

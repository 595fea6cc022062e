"""The irqfd index (kvmirqfast._index): a treap threaded through the records, checked against a
dict and sorted() under random adds and pops."""

import gc
import random
import sys

import pytest

from kvmirqfast._engine import IrqfdRecord
from kvmirqfast._index import IrqfdIndex


def record(key):
    return IrqfdRecord(-1, key)


def test_random_adds_and_pops_match_a_dict():
    rng = random.Random(7)
    index, model = IrqfdIndex(), {}
    for step in range(20000):
        key = rng.randrange(-50, 3000)
        if key in model and rng.random() < 0.6:
            assert index.pop(key) is model.pop(key)
        elif key not in model:
            model[key] = r = record(key)
            index.add(r)
        else:
            with pytest.raises(KeyError):
                index.add(record(key))
        if step % 997 == 0:
            assert [r.key for r in index] == sorted(model)
        assert index.get(key) is model.get(key)
        assert len(index) == len(model)
    assert [r.key for r in index] == sorted(model)


def test_pop_of_a_missing_key_is_a_key_error_and_changes_nothing():
    index = IrqfdIndex()
    index.add(record(5))
    with pytest.raises(KeyError):
        index.pop(6)
    assert [r.key for r in index] == [5] and len(index) == 1


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
def test_depth_stays_logarithmic_in_any_insertion_order(order):
    # Eventfd ids arrive in order; an unbalanced tree would be a list of 16,384 here.
    keys = list(range(16384))
    if order == "descending":
        keys.reverse()
    elif order == "random":
        random.Random(1).shuffle(keys)
    index = IrqfdIndex()
    for k in keys:
        index.add(record(k))
    assert index.depth() <= 4 * 14                  # 2 log2(n) expected; 4x is generous
    for k in keys[::2]:
        index.pop(k)
    assert index.depth() <= 4 * 13
    assert [r.key for r in index] == sorted(keys[1::2])


def test_the_index_holds_its_records_and_lets_them_go():
    index = IrqfdIndex()
    r = record(1)
    base = sys.getrefcount(r)
    index.add(r)
    assert sys.getrefcount(r) == base + 1
    assert index.pop(1) is r
    assert sys.getrefcount(r) == base
    index.add(r)
    del index
    gc.collect()
    assert sys.getrefcount(r) == base


def test_keys_out_of_int64_are_rejected():
    index = IrqfdIndex()
    with pytest.raises(OverflowError):
        index.get(2**63)
    with pytest.raises(TypeError):
        index.get("fd")


def test_records_stay_out_of_the_cycle_collector():
    # A record refers to nothing that refers back; untracked, assigning thousands of irqfds
    # does not feed the collector (see the comment on IrqfdRecord).
    assert not gc.is_tracked(record(1))

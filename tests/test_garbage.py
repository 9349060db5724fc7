"""The collector while a run sends: tuned inside, the process's own settings outside."""

from __future__ import annotations

import gc
import weakref

import pytest

from pipeline.garbage import YOUNG_THRESHOLD, fewer_collections


def test_sending_freezes_what_is_alive_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    alive_before = [object() for _ in range(3)]

    with fewer_collections():
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
        assert alive_before  # frozen above: still alive

    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_the_settings_come_back_when_the_run_fails() -> None:
    before = gc.get_threshold()

    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("the disk is full")

    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_overlapping_runs_restore_the_settings_when_the_last_one_ends() -> None:
    before = gc.get_threshold()
    first, second = fewer_collections(), fewer_collections()

    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # the second still sends
    second.__exit__(None, None, None)

    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_callers_frozen_objects_stay_frozen() -> None:
    gc.freeze()
    try:
        with fewer_collections():
            pass
        # Not thawed (that would make it 0); a frozen object freed meanwhile counts less.
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


class _Node:
    other: _Node | None = None


def test_a_cycle_made_while_sending_is_still_collected() -> None:
    with fewer_collections():
        node = _Node()
        node.other = node
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None

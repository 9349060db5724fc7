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


def test_a_callers_frozen_objects_stay_frozen() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with fewer_collections():
            pass
        assert gc.get_freeze_count() == frozen
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

"""Fewer garbage collections while a run sends: what is alive before it is left alone.

    with fewer_collections():
        await send_all(...)     # gen0 collects every YOUNG_THRESHOLD, not 700, allocations

Python collects its youngest generation every 700 allocations: with 64-256 requests in
flight that is every few milliseconds, and each collection walks every object of every
request still in flight (promoting them, so that older collections walk them again).
Profiled on a 20,000-row job at 64 in flight: the collector took 0.48 s of the run's
6.3 s of CPU (520 young, 48 middle and 4 full collections, the full ones walking every
object start-up made); with the start-up's objects frozen and this threshold, 0.04 s.
Reference counting still frees every request's objects as soon as it is done: only
reference cycles (rare here) wait a little longer.

The process's settings are put back afterwards, so a program that calls
`pipeline.run_frame` keeps its own.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

#: Allocations between two collections of the youngest generation while sending. A
#: request's objects live for its round trip; at this threshold most die before a
#: collection sees them. 2,000 took the collector from 0.48 to 0.06 s of CPU on the
#: job above, 10,000 to 0.04 s, 50,000 no further; a collection of 10,000 young objects
#: pauses the loop about a millisecond.
YOUNG_THRESHOLD = 10_000


class _Tuned:
    """The process's own settings while runs send; runs may overlap (two `arun_frame`
    in one program): the first to start tunes, the last to finish restores."""

    runs = 0
    threshold: tuple[int, ...] = ()
    froze = False


_tuned = _Tuned()
#: Runs in several threads at once (`run_frame` from worker threads) count one at a time.
_counting = threading.Lock()


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Freeze what is alive now (imports, the plan: never garbage while sending) and
    collect the young generation less often; restore both on the way out."""
    with _counting:
        if _tuned.runs == 0:
            _tuned.threshold = gc.get_threshold()
            # A caller that froze objects of its own keeps them frozen: only ours thaw.
            _tuned.froze = gc.get_freeze_count() == 0
            if _tuned.froze:
                gc.freeze()
            gc.set_threshold(YOUNG_THRESHOLD, *_tuned.threshold[1:])
        _tuned.runs += 1
    try:
        yield
    finally:
        with _counting:
            _tuned.runs -= 1
            if _tuned.runs == 0:
                gc.set_threshold(*_tuned.threshold)
                if _tuned.froze:
                    gc.unfreeze()

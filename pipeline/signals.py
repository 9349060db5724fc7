"""SIGINT and SIGTERM during a run: the first stops gently, the second exits at once.

    with draining(stop, engine.abandon, notify=print):
        ...                      # the run; after a signal, stop.reason says which one
    with Signals(loop, on_first=stop_taking_rows) as signals:    # the handlers alone
        ...
    raise stopped(signals.first, "interrupted: ...")   # Interrupted (130) or Terminated (143)

The first signal stops the run taking rows; requests in flight have DRAIN_S to finish,
then they are abandoned; either way the output is written.

Python lets only the main thread install signal handlers, and only the main thread
receives signals: a run in any other thread (`pipeline.run_frame` from a worker
thread, or inside Jupyter's running loop) installs none and leaves signals to its host.
A library call in the main thread installs them as the command does, but the second
signal raises KeyboardInterrupt there (`exit_now=raise_interrupt`) instead of ending
the process it is a guest in.

The handler is Python's own (`signal.signal`), not the event loop's: it runs in the main
thread between any two bytecodes, so a second signal ends the process even while
something blocks the loop, and even while a worker thread (a template rendering without
end, a journal checkpoint) would keep a normal exit waiting for it. Exiting with
`os._exit` is as safe for the checkpoint as `kill -9`, which the journal is built for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

from pipeline.errors import Interrupted, Terminated
from pipeline.progress import plural
from pipeline.records import Stop

HANDLED = (signal.SIGINT, signal.SIGTERM)
#: After SIGINT/SIGTERM, how long in-flight requests may take to finish.
DRAIN_S = 30.0
#: What the second signal prints before the process ends.
AT_ONCE = "interrupted twice: stopped at once; finished rows are kept"


def stopped(sig: signal.Signals | None, message: str) -> Interrupted:
    """The run's failure for a stop by this signal: 143 for SIGTERM, 130 otherwise."""
    return Terminated(message) if sig == signal.SIGTERM else Interrupted(message)


class Signals:
    """Installs the handlers for the `with` block and puts the old ones back after."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_first: Callable[[signal.Signals], None],
        exit_now: Callable[[int], None] = os._exit,
    ) -> None:
        self._loop = loop
        self._on_first = on_first
        self._exit_now = exit_now
        self._previous: dict[signal.Signals, Any] = {}
        #: The first signal received, if any.
        self.first: signal.Signals | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.first is not None:
            sys.stderr.write(f"error: {AT_ONCE}\n")
            sys.stderr.flush()
            self._exit_now(stopped(sig, AT_ONCE).exit_code)
            return
        self.first = sig
        # The loop does the gentle part, when it next runs.
        self._loop.call_soon_threadsafe(self._on_first, sig)

    def __enter__(self) -> Signals:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def raise_interrupt(exit_code: int) -> None:
    """A second signal's `exit_now` for a run inside someone else's program (the API):
    unwind with KeyboardInterrupt rather than end the process."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def draining(
    stop: Stop,
    abandon: Callable[[], int],
    notify: Callable[[str], None],
    exit_now: Callable[[int], None] = os._exit,
) -> Iterator[None]:
    """A run's handlers: the first signal asks `stop` and drains; DRAIN_S later
    `abandon()` (the engine's) gives up the requests still out, and the output is
    written; a second signal calls `exit_now` (exits at once). Off the main thread,
    where Python installs no handler, nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    drain: list[asyncio.TimerHandle] = []

    def on_drain_timeout(sig: signal.Signals) -> None:
        abandoned = abandon()
        if stop.reason is not None and not isinstance(stop.reason, Interrupted):
            return  # a halt or the budget came first: its reason is the one to act on
        # The signal's own reason, told now what the drain left behind.
        stop.reason = stopped(
            sig,
            f"interrupted: {plural(abandoned, 'request')} still in flight after "
            f"{DRAIN_S:g} s {'was' if abandoned == 1 else 'were'} abandoned (the server may "
            "bill them; a resume sends them again); finished rows are kept and the output "
            "is written",
        )

    def on_signal(sig: signal.Signals) -> None:
        # A run already halting (a halt, the budget) keeps its reason, the one to act on;
        # the first signal still drains and writes the output, like any first signal.
        stop.ask(stopped(sig, "interrupted: finished rows are kept; run again to resume"))
        # The drain's end abandons the requests still out and writes the output; only
        # a second signal stops without it.
        drain.append(loop.call_later(DRAIN_S, on_drain_timeout, sig))
        notify(
            f"stopping: requests in flight have up to {DRAIN_S:.0f} s to finish, then the "
            "output is written; interrupt again to stop at once"
        )

    with Signals(loop, on_signal, exit_now):
        try:
            yield
        finally:
            for handle in drain:
                handle.cancel()

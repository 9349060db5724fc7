"""SIGINT and SIGTERM during a run: the first stops gently, the second exits at once.

    with Signals(loop, on_first=stop_taking_rows) as signals:
        ...                      # the run; signals.first is the signal that stopped it
    raise stopped(signals.first, "interrupted: ...")   # Interrupted (130) or Terminated (143)

The handler is Python's own (`signal.signal`), not the event loop's: it runs in the main
thread between any two bytecodes, so a second signal ends the process even while
something blocks the loop, and even while a worker thread (a template rendering without
end, a journal checkpoint) would keep a normal exit waiting for it. Exiting with
`os._exit` is as safe for the checkpoint as `kill -9`, which the journal is built for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from pipeline.errors import Interrupted, Terminated

HANDLED = (signal.SIGINT, signal.SIGTERM)
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

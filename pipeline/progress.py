"""What a person watching sees: a live bar on a terminal, a plain line every few seconds
in CI or cron, and a summary table at the end.

    async with Display(counters, stats):              # a bar on a terminal, else lines
    async with Display(counters, stats, live=True):   # rich's bar (a notebook draws it too)

The counters have one owner each (the journal writer for rows, the dispatcher for
requests); the display only reads them.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from pipeline.dispatch import DispatchStats
from pipeline.records import RowResult

if TYPE_CHECKING:  # imported on a terminal only (Display.__aenter__)
    from rich.progress import Progress, TaskID

#: How often the plain (non-terminal) display prints a line.
PLAIN_INTERVAL_S = 5.0


@dataclass
class Counters:
    """Rows committed in this run; owned by the journal writer."""

    total: int
    #: Rows already done by an earlier run, skipped.
    resumed: int = 0
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    #: Rows answered by an identical request's answer (dedupe), not sent.
    shared: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, results: Iterable[RowResult]) -> None:
        """Count results once they are committed."""
        for r in results:
            if r.status == "ok":
                self.ok += 1
            else:
                self.failed += 1
            self.prompt_tokens += r.prompt_tokens or 0
            self.completion_tokens += r.completion_tokens or 0
            self.cost_usd += r.cost_usd or 0.0
            self.shared += r.attempts == 0 and r.request_id is not None

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def describe(c: Counters, stats: DispatchStats) -> str:
    minutes = max(c.elapsed, 1e-9) / 60
    tokens = (c.prompt_tokens + c.completion_tokens) / minutes
    return (
        f"{c.ok:,} ok, {c.failed:,} failed · {stats.sent / max(c.elapsed, 1e-9):,.1f} req/s · "
        f"{tokens:,.0f} tok/min · ${c.cost_usd:,.4f}"
    )


class Display:
    """Shows progress until closed. `async with Display(...)` around the run."""

    def __init__(
        self,
        counters: Counters,
        stats: DispatchStats,
        stream: TextIO | None = None,
        live: bool | None = None,
    ):
        self._counters = counters
        self._stats = stats
        self._stream = stream or sys.stderr
        #: rich's live bar, or a plain line every PLAIN_INTERVAL_S; None: on a terminal.
        self._live = self._stream.isatty() if live is None else live
        self._task: asyncio.Task[None] | None = None
        self._bar: Progress | None = None
        self._bar_id: TaskID | None = None

    async def __aenter__(self) -> Display:
        if self._live:
            # rich only on a terminal (cron and CI get plain lines): start-up time.
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,}"),
                TextColumn("{task.fields[line]}"),
                TimeRemainingColumn(),
                console=Console(file=self._stream),
                transient=False,
            )
            self._bar.start()
            self._bar_id = self._bar.add_task("rows", total=self._counters.total, line="")
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self._refresh()
        if self._bar is not None:
            self._bar.stop()

    async def _loop(self) -> None:
        interval = 0.25 if self._live else PLAIN_INTERVAL_S
        while True:
            await asyncio.sleep(interval)
            self._refresh()

    def _refresh(self) -> None:
        c = self._counters
        done = c.resumed + c.done
        if self._bar is not None and self._bar_id is not None:
            self._bar.update(self._bar_id, completed=done, line=describe(c, self._stats))
            return
        rate = c.done / max(c.elapsed, 1e-9)
        left = (c.total - done) / rate if rate > 0 else float("inf")
        eta = f"ETA {_duration(left)}" if left != float("inf") else "ETA -"
        percent = 100 * done / max(c.total, 1)
        print(
            f"{done:,}/{c.total:,} rows ({percent:.0f}%) · {describe(c, self._stats)} · {eta}",
            file=self._stream,
            flush=True,
        )


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel, where rich draws its bar as a widget.

    Looked up as rich does, without importing IPython: a kernel has imported it."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def summary_table(title: str, rows: Sequence[tuple[str, str]], stream: TextIO) -> None:
    from rich.console import Console  # at the end of a run: not on the way to the first request
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows:
        # Text, not markup: "[price]" or a path with brackets must print as it is.
        table.add_row(Text(name), Text(value))
    Console(file=stream, soft_wrap=True).print(table)


def usd(amount: float) -> str:
    """Dollars to four places, or to three significant digits below a cent, so that a
    cheap job (embeddings) does not show $0.0000."""
    if amount == 0 or amount >= 0.01:
        return f"${amount:,.4f}"
    return f"${amount:.{2 - math.floor(math.log10(amount))}f}"


def plural(n: int, noun: str) -> str:
    """`n` and the noun, plural unless there is one: "1 row", "2,000 rows"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"

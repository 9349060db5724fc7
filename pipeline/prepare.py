"""Rows to requests: render the rows not done yet, refuse what cannot be sent, build each
request with the provider's URL and headers, and pack rows of a batching endpoint.

    build = RequestBuilder(plan.provider, base_url, plan.api_key, plan.endpoint)
    dedupe = Dedupe(journal.answered)          # or None: the job sends every row
    requests = Requests(plan, journal, build, dedupe=dedupe, sink=writer, stop=stop)
    async for work in requests.stream():     # Work ready to send, in input order
        await inbox.put(work)

Rows that fail before sending (a template error, a prompt over the context window) and
rows an identical request answers (dedupe) never become Work: their results go
straight to `sink`, the journal's writer. Any engine sends what `stream` yields: the
online one through its workers, batch mode into a provider's batch file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import polars as pl

from pipeline.bounds import RowSizer
from pipeline.dedupe import Dedupe, request_digest
from pipeline.endpoints import Endpoint, Item, Provider
from pipeline.endpoints.base import JSON
from pipeline.errors import Halted
from pipeline.journal import Journal
from pipeline.plan import BATCH_ROWS, Plan, limited
from pipeline.records import (
    ROW_INDEX,
    UNSENT,
    HttpRequest,
    Outcome,
    RowResult,
    Stop,
    Work,
    rejected,
)

#: Text rows prepared at a time in the event loop: rendering one takes tens of
#: microseconds, so a chunk holds the loop a few milliseconds at most. In the loop, not
#: a thread: handing 500 rows to a thread and back, and the thread's contention for the
#: GIL while it renders, cost 5-10% of a run's CPU (profiled: 20,000 rows of 400
#: characters, 0.33 against 0.32 ms of CPU a request, median of 3).
LOOP_ROWS = 100


class Sink(Protocol):
    """Where results that need no request go: the journal's writer."""

    async def put(self, entry: Outcome | RowResult, /) -> None: ...


class RequestBuilder:
    """The HTTP request for some payloads: the provider's URL and headers, the
    endpoint's encoding."""

    def __init__(self, provider: Provider, base_url: str, api_key: str | None, endpoint: Endpoint):
        self.url = provider.url(base_url, endpoint.path)
        self.headers = provider.headers(api_key)
        self._endpoint = endpoint
        self._json_headers = {**self.headers, "content-type": JSON}

    def __call__(self, payloads: Sequence[Any]) -> HttpRequest:
        body, content_type = self._endpoint.encode(payloads)
        headers = (
            self._json_headers
            if content_type == JSON
            else {**self.headers, "content-type": content_type}
        )
        return HttpRequest("POST", self.url, headers, body)


class Packer:
    """Rows of a batching endpoint (embeddings) gathered into one request, up to its
    rows and tokens per request; other endpoints' rows pass through as they are."""

    def __init__(self, endpoint: Endpoint, build: RequestBuilder) -> None:
        self._endpoint = endpoint
        self._build = build
        self._group: list[Work] = []
        self._tokens = 0

    def add(self, work: Work) -> Work | None:
        """A request ready to send, if `work` is one or it filled one."""
        endpoint = self._endpoint
        if endpoint.batch_rows == 1:
            return work
        ready = None
        full = len(self._group) >= endpoint.batch_rows
        if full or (self._group and self._tokens + work.tokens > endpoint.batch_tokens):
            ready = self.flush()
        self._group.append(work)
        self._tokens += work.tokens
        return ready

    def flush(self) -> Work | None:
        """The rows waiting, as one request."""
        group, self._group, self._tokens = self._group, [], 0
        if not group:
            return None
        payloads = [w.payload for w in group]
        return Work(
            rows=tuple(w.rows[0] for w in group),
            request=self._build(payloads),
            tokens=sum(w.tokens for w in group),
            digests=tuple(w.digests[0] for w in group),
            weights=tuple(w.weights[0] for w in group),
            payload=payloads,
        )


class Requests:
    """A run's rows as requests: those not done yet, rendered, checked and built."""

    def __init__(
        self,
        plan: Plan,
        journal: Journal,
        build: RequestBuilder,
        *,
        dedupe: Dedupe | None,
        sink: Sink,
        stop: Stop,
    ) -> None:
        self._plan = plan
        self._journal = journal
        self._build = build
        self._dedupe = dedupe
        self._sink = sink
        self._stop = stop
        #: Each row's item, or why it fails before sending (as validate sees it too).
        self._sizer = RowSizer(plan.job, plan.endpoint, plan.renderer)

    async def stream(self) -> AsyncIterator[Work]:
        """Work to send, batch by batch, until the input ends or the run stops."""
        plan, stop = self._plan, self._stop
        packer = Packer(plan.endpoint, self._build)
        batches = limited(plan.source.batches(BATCH_ROWS), plan.options.limit)
        while not stop.stopped:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            files = plan.endpoint.prepare_reads_files
            step = plan.endpoint.prepare_rows if files else LOOP_ROWS
            for start in range(0, batch.height, step):
                if stop.stopped:
                    break
                chunk = batch.slice(start, step)
                if files:  # file reads: in a thread, so answers are read meanwhile
                    works, ready = await asyncio.to_thread(self._prepare, chunk)
                else:
                    works, ready = self._prepare(chunk)
                    await asyncio.sleep(0)  # let the workers send what is ready
                for entry in ready:
                    await self._sink.put(entry)
                for work in works:
                    if stop.stopped:
                        break
                    if await self._leads(work) and (packed := packer.add(work)) is not None:
                        yield packed
        if not stop.stopped and (last := packer.flush()) is not None:
            yield last

    async def _leads(self, work: Work) -> bool:
        """True if `work` must be sent; else an identical request answers it."""
        if self._dedupe is None:
            return True
        claim = self._dedupe.claim(work)
        if isinstance(claim, RowResult):
            await self._sink.put(claim)
            return False
        return claim

    def _prepare(self, batch: pl.DataFrame) -> tuple[list[Work], list[Outcome | RowResult]]:
        """Render a batch's rows not yet done into requests (in a thread for file rows).

        Each Work is one row; a batching endpoint's rows are encoded together later.
        """
        rows = batch.get_column(ROW_INDEX)
        done = self._journal.done_rows(
            int(rows.min()),  # type: ignore[arg-type]
            int(rows.max()),  # type: ignore[arg-type]
            failed_too=not self._plan.options.retry_failed,
        )
        endpoint = self._plan.endpoint
        works: list[Work] = []
        ready: list[Outcome | RowResult] = []
        for row in batch.iter_rows(named=True):
            if self._stop.stopped:
                break  # Ctrl-C: a render may take MAX_RENDER_S; do not start the next
            index = row[ROW_INDEX]
            if index in done:
                continue
            sized = self._sizer.size(row)
            if not isinstance(sized, Item):
                ready.append(rejected(index, sized))
                self._halt_if_runaway()
                continue
            size = sized.tokens + self._sizer.output_tokens
            digests, weights = (request_digest(sized.key),), (sized.tokens,)
            works.append(Work((index,), UNSENT, size, digests, weights, sized.payload))
        if self._dedupe is not None:
            works, shared = self._dedupe.known(works)
            ready.extend(shared)
        if endpoint.batch_rows == 1:  # encoded only for rows that will be sent
            for work in works:
                work.request = self._build([work.payload])
        return works, ready

    def _halt_if_runaway(self) -> None:
        """A template past its render limits row after row loops whatever the row: stop
        rather than spend MAX_RENDER_S on each of a million rows."""
        sizer = self._sizer
        if sizer.runaway_reached:
            self._stop.ask(
                Halted(
                    f"{sizer.runaway} rows in a row ran past the render limits "
                    f"({sizer.last_limit}): the template is what to fix; `pipeline validate` "
                    "shows the rows (done rows are kept)"
                )
            )

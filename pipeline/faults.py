"""Faults that will not clear stop the run early, with a diagnosis, leaving rows pending.

    watch = FaultWatch(clock=time.monotonic)
    watch.succeeded()                          # any answer: the server serves
    halt = watch.outage(failure, gave_up=False)   # Halted, or None to retry
    pause, halt = watch.rate_limited(failure.retry_after, base_s=0.5)

Dispatch retries a failure row by row; that is right for a fault that clears (a reset, a
500) and wrong for one that will not (a refused port, a name that does not resolve, a
captive portal's page, a 429 storm): two hundred rows then fail one by one, each after
its own retries, and a resume must send them all again. This watch sees every attempt
of the run and says when the run, not the row, must stop: the rows it has not answered
stay pending in the journal, and the same command resumes once the fault is fixed.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import Halted, RequestFailure

#: Before any request has succeeded, this many outages in a row halt the run: a server
#: that refuses the first three connections (or answers them with an HTML page) is not
#: there, and each row retrying on its own would take minutes to say so.
FIRST_OUTAGES = 3
#: 429s with no answer between, for this long, halt the run as persistently rate limited:
#: a per-minute limit clears within a minute or two; ten minutes of nothing but 429s is a
#: limit the job cannot meet (a shared key, a daily cap), not a rate to wait out.
RATE_LIMIT_HALT_S = 600.0
#: While 429s keep coming with no answer between, each new pause (one that starts after
#: the last one ended) doubles from the job's backoff_s up to this; the server's
#: retry-after wins when longer. A minute: OpenAI's limits are per minute.
RATE_LIMIT_PAUSE_MAX_S = 60.0


class FaultWatch:
    """Counts the run's attempts since its last success; says when to stop."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._answered = False  # any request of this run succeeded
        self._outages = 0  # outages since the last success
        self._storm_since: float | None = None  # first 429 since the last success
        self._rounds = 0  # pauses in this storm
        self._pause_until = 0.0

    def succeeded(self) -> None:
        self._answered = True
        self._outages = 0
        self._storm_since = None
        self._rounds = 0

    def outage(self, failure: RequestFailure, *, gave_up: bool) -> Halted | None:
        """A failure that says the server is not serving. Halt when nothing has been
        answered yet and FIRST_OUTAGES came in a row (only for a `failure.outage` kind:
        one that cannot be a passing blip, as a gateway's 502 can), or when a row used all its
        attempts and no request has succeeded since FIRST_OUTAGES outages ago: the server
        has been down for a whole retry cycle, and every other row would wait the same."""
        self._outages += 1
        if self._outages < FIRST_OUTAGES:
            return None
        if not gave_up and (self._answered or not failure.outage):
            return None
        since = "since the start" if not self._answered else "since the last answer"
        return Halted(
            f"the server is not serving: {self._outages} requests in a row failed "
            f"{since} ({failure.message}). Nothing was lost: the rows not done are "
            "pending; fix that, then run the same command again to resume"
        )

    def rate_limited(self, wait: float | None, *, base_s: float) -> tuple[float, Halted | None]:
        """A 429: how long every worker pauses (growing while no answer comes between),
        and Halted once the storm has lasted RATE_LIMIT_HALT_S."""
        now = self._clock()
        if self._storm_since is None:
            self._storm_since = now
        elapsed = now - self._storm_since
        if elapsed >= RATE_LIMIT_HALT_S:
            return 0.0, Halted(
                f"persistently rate limited: only 429s for {elapsed:.0f} s with no answer "
                "between, pausing longer each time. The rows not done are pending; lower "
                "--rpm / --tpm / --concurrency to what the key allows (another job may "
                "share it), then run the same command again to resume"
            )
        if now >= self._pause_until or self._rounds == 0:  # a new pause, not one in hand
            self._rounds += 1
        # The first pause is the server's (or backoff_s); each later one grows.
        grown = min(RATE_LIMIT_PAUSE_MAX_S, base_s * 2.0 ** (self._rounds - 1))
        pause = max(wait if wait is not None else base_s, grown if self._rounds > 1 else 0.0)
        self._pause_until = max(self._pause_until, now + pause)
        return pause, None

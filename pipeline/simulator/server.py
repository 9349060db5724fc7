"""The simulator's server: its routes, and three ways to run it.

    async with Simulator(SimConfig(seed=7)) as base_url:     # inside a running loop
        ...
    with running_in_thread(SimConfig(rpm=600)) as (base_url, sim):   # any client, any loop
        ...
    serve(SimConfig(rpm=500), port=8080)                      # `pipeline simulate`

Each API module adds its routes on the simulator's one `Exchange` (exchange.py), in the
order of `_ROUTES`: aiohttp tries dynamic routes in the order they were added, so the
catch-all 404 for an unknown /v1 path comes last. `GET /_sim/stats` returns the
counters as JSON for a test in another process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final

import orjson
from aiohttp import web

from pipeline.simulator import (
    anthropic,
    audio,
    azure,
    chat,
    embeddings,
    images,
    models,
    responses,
)
from pipeline.simulator.api_errors import ApiError, error_body
from pipeline.simulator.config import SimConfig, SimStats
from pipeline.simulator.exchange import MAX_BODY_BYTES, Exchange

# stop() lets in-flight requests finish this long, then cancels them (a "slow" answer
# must not hold a test's teardown for seconds).
_SHUTDOWN_GRACE_S: Final = 0.5
_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# An unlimited, faultless, instant API (frozen, so one instance serves every default).
_DEFAULT_CONFIG: Final = SimConfig()

#: Each API's routes, in the order they are added (before the catch-all 404).
_ROUTES: Final[tuple[Callable[[Exchange, web.UrlDispatcher], None], ...]] = (
    chat.add_routes,
    embeddings.add_routes,
    models.add_routes,
    anthropic.add_routes,
    images.add_routes,
    audio.add_routes,
    azure.add_routes,
    responses.add_routes,
)


class Simulator:
    """The server; `start()` it inside a running loop, or use `async with`.

    `clock` is for tests that move time by hand instead of sleeping; it drives the
    rate-limit buckets only.
    """

    def __init__(
        self, config: SimConfig = _DEFAULT_CONFIG, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.exchange = Exchange(config, clock)
        self.config: SimConfig = config
        self.stats: SimStats = self.exchange.stats
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0: a free port) and return the base URL, ".../v1"."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        bound = sock.getsockname()[1]
        return f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{bound}/v1"

    async def stop(self) -> None:
        """Stop listening; in-flight requests get a short grace, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> str:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        router = app.router
        for add_routes in _ROUTES:
            add_routes(self.exchange, router)
        router.add_route("*", "/v1/{tail:.*}", self._unknown)
        router.add_get("/_sim/stats", self._stats_route)
        return app

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        async def refuse(started: float) -> web.StreamResponse:
            message = f"Invalid URL ({request.method} {request.path})"
            raise ApiError(404, error_body(message, "invalid_request_error", "unknown_url"))

        return await self.exchange.guarded(request, refuse)

    async def _stats_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.stats.as_dict()), headers=_JSON_HEADERS)


# ---------------------------------------------------------------------------------------
# Running it


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until SIGINT or SIGTERM; for `pipeline simulate`.

    >>> serve(SimConfig(rpm=500), port=8080)  # blocks
    simulator listening on http://127.0.0.1:8080/v1
    """
    asyncio.run(_serve_until_signalled(config, host, port))


async def _serve_until_signalled(config: SimConfig, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulator = Simulator(config)
    try:
        base_url = await simulator.start(host, port)
        print(f"simulator listening on {base_url}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await simulator.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def running_in_thread(config: SimConfig = _DEFAULT_CONFIG) -> Iterator[tuple[str, Simulator]]:
    """Run a simulator on its own loop in a daemon thread, on a free loopback port.

    >>> with running_in_thread(SimConfig(seed=1)) as (base_url, sim):
    ...     run_my_client(base_url)   # any client, any loop, any thread
    ...     assert sim.stats.faults == 0
    """
    simulator = Simulator(config)
    ready: concurrent.futures.Future[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]]
    ready = concurrent.futures.Future()
    thread = threading.Thread(
        target=asyncio.run, args=(_host(simulator, ready),), name="simulator", daemon=True
    )
    thread.start()
    try:
        base_url, loop, stop = ready.result()
    except BaseException:
        thread.join()
        raise
    try:
        yield base_url, simulator
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()


async def _host(
    simulator: Simulator,
    ready: concurrent.futures.Future[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]],
) -> None:
    # asyncio.run() around this cancels whatever is left and closes the loop cleanly.
    stop = asyncio.Event()
    try:
        base_url = await simulator.start()
    except BaseException as error:
        ready.set_exception(error)
        return
    ready.set_result((base_url, asyncio.get_running_loop(), stop))
    try:
        await stop.wait()
    finally:
        await simulator.stop()

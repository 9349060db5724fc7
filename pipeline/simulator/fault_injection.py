"""Faults the simulator injects: the kinds, the `<<sim:...>>` directives, and the
answers of a misbehaving server.

    kind = directive("Summarise this <<sim:500:2>>", count=1)      # "500"
    await misbehave(replies, request, "truncated", started, answer)

A kind works both as a directive in a row's text and in `SimConfig.faults`, drawn at
`fault_rate`. The kinds with a fixed error body are `api_errors.CANNED`; the others
need the transport or the real answer: "reset" (a TCP RST), "truncated" (half the
promised body, then a hang-up), "malformed" (half the body, well framed), "slow" (the
answer after `SLOW_DELAY_S`), and the misbehaviours: "html" (a 200 with a captive
portal's page), "bomb" (a gzip body that inflates to `BOMB_BYTES`), "silent" (never
answers), "zerolimit" (rate-limit headers at zero), "echokey" (a 401 that repeats the
key).
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from pipeline.simulator.api_errors import CANNED, error_body, invalid
from pipeline.simulator.request_fields import given_key

# "slow" holds the answer this long: longer than the read timeouts tests configure.
SLOW_DELAY_S: Final = 2.0
# "silent" accepts the request and never answers (stop() cancels it).
SILENT_S: Final = 3600.0
# "bomb" sends a gzip body this big once inflated, from about 100 KB on the wire: more
# than any client should hold for one answer.
BOMB_BYTES: Final = 128 * 2**20
# "zerolimit" answers with remaining 0 and this reset: a client must wait, not stall.
ZERO_LIMIT_RESET: Final = "20ms"
# "html" answers 200 with the page a captive portal or a proxy's login would send.
HTML_PAGE: Final = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in to the network</title></head>"
    b"<body><form action='/login'>Accept the terms to continue</form></body></html>\n"
)
# retry-after-ms of an injected 429: a random fault, and a `<<sim:429>>` directive.
FAULT_RETRY_MS: Final = 200
DIRECTIVE_RETRY_MS: Final = 100

_DIRECTIVE: Final = re.compile(r"<<sim:([A-Za-z0-9]+)(?::(\d+))?>>")
#: A cheap test on the raw body before any regex; short enough to survive "<" escaped
#: as \u003c by some JSON encoders.
DIRECTIVE_MARK: Final = b"sim:"

#: Kinds that need the transport or the real answer rather than a canned body.
TRANSPORT_KINDS: Final = frozenset(
    {"reset", "truncated", "malformed", "slow", "html", "bomb", "silent", "zerolimit", "echokey"}
)
#: Every kind works as a directive and in `SimConfig.faults`.
KINDS: Final = frozenset(CANNED) | TRANSPORT_KINDS | {"404model"}


def directive(text: str, count: int) -> str | None:
    """The kind a `<<sim:KIND[:N]>>` directive asks for this time, or None.

    `count`: the times this body has been received, this one included.
    """
    match = _DIRECTIVE.search(text)
    if match is None:
        return None
    kind, times = match.group(1), match.group(2)
    if kind not in KINDS:
        raise invalid(
            f"Unknown simulator directive <<sim:{kind}>>; valid kinds: {', '.join(sorted(KINDS))}."
        )
    if times is not None and count > int(times):
        return None
    return kind


class Replier(Protocol):
    """How a fault answers: the exchange's JSON replies and headers (exchange.py)."""

    def reply(
        self, status: int, payload: bytes, started: float, extra: Mapping[str, str] | None = None
    ) -> web.Response: ...

    def headers(self, started: float) -> dict[str, str]: ...


Answer = Callable[[], dict[str, Any]]


async def misbehave(
    replies: Replier, request: web.Request, kind: str, started: float, answer: Answer
) -> web.StreamResponse:
    """Answer with a transport-level fault: reset, truncated, malformed or slow; or
    a misbehaving server's answer: an HTML page, a gzip bomb, silence, rate-limit
    headers at zero, a key echoed back."""
    transport = request.transport
    if kind == "reset" or transport is None:
        _reset(transport)
        return web.Response()  # aiohttp finds the transport closed and writes nothing
    if kind == "slow":
        await asyncio.sleep(SLOW_DELAY_S)
        return replies.reply(200, orjson.dumps(answer()), started)
    if kind in _MISBEHAVIOURS:
        return await _MISBEHAVIOURS[kind](replies, request, started, answer)
    body = orjson.dumps(answer())
    if kind == "malformed":
        return replies.reply(200, body[: len(body) // 2], started)
    # truncated: promise the whole body, send half, hang up.
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in replies.headers(started).items()) + "\r\n"
    transport.write(head.encode() + body[: len(body) // 2])
    transport.close()
    return web.Response()


async def _html(
    replies: Replier, request: web.Request, started: float, answer: Answer
) -> web.StreamResponse:
    return web.Response(body=HTML_PAGE, status=200, content_type="text/html")


async def _bomb(
    replies: Replier, request: web.Request, started: float, answer: Answer
) -> web.StreamResponse:
    headers = replies.headers(started)
    headers.update({"Content-Type": "application/json", "Content-Encoding": "gzip"})
    return web.Response(body=_gzip_bomb(), status=200, headers=headers)


async def _silent(
    replies: Replier, request: web.Request, started: float, answer: Answer
) -> web.StreamResponse:
    await asyncio.sleep(SILENT_S)
    return web.Response(status=504)


async def _zero_limit(
    replies: Replier, request: web.Request, started: float, answer: Answer
) -> web.StreamResponse:
    zero = {}
    for name in ("requests", "tokens"):
        zero[f"x-ratelimit-limit-{name}"] = "100"
        zero[f"x-ratelimit-remaining-{name}"] = "0"
        zero[f"x-ratelimit-reset-{name}"] = ZERO_LIMIT_RESET
    return replies.reply(200, orjson.dumps(answer()), started, zero)


async def _echo_key(
    replies: Replier, request: web.Request, started: float, answer: Answer
) -> web.StreamResponse:
    """A careless proxy's 401 that repeats the key it was given, whole."""
    message = f"Incorrect API key provided: {given_key(request.headers)}."
    body = error_body(message, "invalid_request_error", "invalid_api_key")
    return replies.reply(401, orjson.dumps(body), started)


_Misbehaviour = Callable[[Replier, web.Request, float, Answer], Awaitable[web.StreamResponse]]
_MISBEHAVIOURS: Final[dict[str, _Misbehaviour]] = {
    "html": _html,
    "bomb": _bomb,
    "silent": _silent,
    "zerolimit": _zero_limit,
    "echokey": _echo_key,
}


@functools.cache
def _gzip_bomb() -> bytes:
    """A JSON-looking gzip body that inflates to BOMB_BYTES (built once, in chunks)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    parts = [packer.compress(b'{"id": "bomb", "choices": [{"message": {"content": "')]
    chunk = b"a" * 2**20
    parts.extend(packer.compress(chunk) for _ in range(BOMB_BYTES // len(chunk)))
    parts.append(packer.compress(b'"}}]}'))
    parts.append(packer.flush())
    return b"".join(parts)


def _reset(transport: asyncio.Transport | None) -> None:
    """Drop the connection with a TCP RST, as a crashed proxy would."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger 0: close sends RST instead of FIN, so the client sees a reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()

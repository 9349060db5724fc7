"""A strict OpenAI-compatible chat server, written apart from `pipeline` (it imports
nothing of it), for bench/independent.py.

    python bench/strict_server.py --port 8701 --rpm 6000 --tpm 600000 \\
        --count o200k --window second --fault-rate 0.05

A request costs its prompt tokens (each message's text + 4, + 3 for the reply) plus
its max_tokens, counted either with o200k_base (as tiktoken would) or at
ceil(characters / 4) (as a limiter estimating from characters would). Limits are
enforced either over a sliding one-second window (OpenAI: "60,000 requests/minute may
be enforced as 1,000 requests/second") or by a bucket holding one second's worth and
refilling continuously. Over the limit: a 429 with `retry-after-ms`. Every answer
carries `x-ratelimit-*` headers. Faults, drawn after admission: 3 in 5 a 500, 1 a
connection reset, 1 a truncated body. `GET /stats` says what was admitted, when.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import random
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web


def _counter(kind: str) -> Callable[[str], int]:
    if kind == "chars4":
        return lambda text: math.ceil(len(text) / 4)
    # bpe-openai's compiled module, as a tiktoken-like user would count o200k_base.
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None
    assert spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = next(p for p in folder.glob("_bindings.*") if p.suffix in (".so", ".pyd"))
    loader = importlib.machinery.ExtensionFileLoader("bpe_openai._bindings", str(path))
    module_spec = importlib.util.spec_from_file_location(loader.name, path, loader=loader)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    count: Callable[[str], int] = module.tokenizer_for_encoding("o200k_base").count
    return count


class Limits:
    """Requests and tokens per second, by sliding window or by bucket."""

    def __init__(self, rpm: int, tpm: int, window: str) -> None:
        self.per_second = (rpm / 60, tpm / 60)
        self.window = window == "second"
        self.sent: collections.deque[tuple[float, int]] = collections.deque()
        self.level = list(self.per_second)
        self.at = time.monotonic()

    def remaining(self, now: float) -> tuple[float, float]:
        if self.window:
            while self.sent and self.sent[0][0] <= now - 1.0:
                self.sent.popleft()
            used = sum(cost for _, cost in self.sent)
            return self.per_second[0] - len(self.sent), self.per_second[1] - used
        elapsed, self.at = now - self.at, now
        for i, rate in enumerate(self.per_second):
            self.level[i] = min(rate, self.level[i] + elapsed * rate)
        return self.level[0], self.level[1]

    def admit(self, now: float, cost: int) -> tuple[bool, float, float]:
        requests, tokens = self.remaining(now)
        if requests < 1 or tokens < cost:
            return False, requests, tokens
        if self.window:
            self.sent.append((now, cost))
        else:
            self.level[0] -= 1
            self.level[1] -= cost
        return True, requests - 1, tokens - cost


def make_app(args: argparse.Namespace) -> web.Application:
    count = _counter(args.count)
    limits = Limits(args.rpm, args.tpm, args.window)
    rng = random.Random(args.seed)
    stats: collections.Counter[str] = collections.Counter()
    span: dict[str, float] = {}

    def headers(requests: float, tokens: float) -> dict[str, str]:
        rps, tps = limits.per_second
        return {
            "x-ratelimit-limit-requests": str(args.rpm),
            "x-ratelimit-limit-tokens": str(args.tpm),
            "x-ratelimit-remaining-requests": str(max(0, int(requests))),
            "x-ratelimit-remaining-tokens": str(max(0, int(tokens))),
            "x-ratelimit-reset-requests": f"{max(0.0, rps - requests) / rps:.3f}s",
            "x-ratelimit-reset-tokens": f"{max(0.0, tps - tokens) / tps:.3f}s",
        }

    async def chat(request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        now = time.monotonic()
        prompt = 3 + sum(4 + count(str(m.get("content") or "")) for m in body["messages"])
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        cost = prompt + int(limit)
        admitted, requests, tokens = limits.admit(now, cost)
        if not admitted:
            stats["429"] += 1
            rps, tps = limits.per_second
            wait_s = max(0.001, (cost - tokens) / tps, (1 - requests) / rps)
            error = {"message": "Rate limit reached", "code": "rate_limit_exceeded"}
            return web.json_response(
                {"error": error},
                status=429,
                headers={**headers(requests, tokens), "retry-after-ms": str(int(wait_s * 1000))},
            )
        stats["admitted"] += 1
        stats["tokens"] += cost
        span.setdefault("first", now)
        await asyncio.sleep(rng.uniform(args.latency_ms[0], args.latency_ms[1]) / 1000)
        if rng.random() < args.fault_rate:
            stats["faults"] += 1
            kind = rng.choice(["500", "500", "500", "reset", "truncated"])
            if kind == "500":
                error = {"message": "The server had an error", "type": "server_error"}
                return web.json_response({"error": error}, status=500)
            if kind == "reset":
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError
            return web.Response(body=b'{"id": "x", "choices": [', content_type="application/json")
        stats["ok"] += 1
        span["last"] = time.monotonic()
        usage = {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "A short summary."},
            "finish_reason": "stop",
        }
        answer = {
            "id": f"chatcmpl-{stats['ok']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }
        return web.json_response(answer, headers=headers(requests, tokens))

    async def get_stats(request: web.Request) -> web.StreamResponse:
        seconds = span.get("last", 0.0) - span.get("first", 0.0)
        # time.monotonic() is the system's clock on Linux: the harness compares it with
        # when it spawned the client, for the start-up time.
        first = span.get("first")
        return web.json_response({**stats, "span_s": max(seconds, 0.0), "first_at": first})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", get_stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rpm", type=int, required=True)
    parser.add_argument("--tpm", type=int, required=True)
    parser.add_argument("--count", choices=("o200k", "chars4"), default="o200k")
    parser.add_argument("--window", choices=("second", "bucket"), default="second")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, nargs=2, default=(20.0, 80.0))
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    web.run_app(make_app(args), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()

"""Runs against servers that enforce their limits over a sliding second, as OpenAI may
("60,000 requests/minute may be enforced as 1,000 requests/second"): what their
`x-ratelimit-remaining-*` headers say is left is spent at once, and never more."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
from aiohttp import web
from conftest import invoke, read_output, serving_app, write_job

#: Requests the window admits a second, and its length.
PER_SECOND = 20
WINDOW_S = 1.0


def window_server(
    per_second: int, tokens_per_second: int | None = None
) -> tuple[web.Application, collections.Counter[str]]:
    """A chat server admitting `per_second` requests (and tokens, as prompt characters
    / 4 + max_tokens) in any sliding second; over that, a 429 with `retry-after-ms`.
    Also returns its counts of requests admitted and refused."""
    sent: collections.deque[tuple[float, int]] = collections.deque()
    counts = collections.Counter[str]()

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        cost = sum(len(str(m["content"])) // 4 + 4 for m in body["messages"]) + 3
        cost += int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        now = time.monotonic()
        while sent and sent[0][0] <= now - WINDOW_S:
            sent.popleft()
        tokens_used = sum(c for _, c in sent)
        tokens_left = (tokens_per_second or 0) - tokens_used
        fits = len(sent) < per_second and (tokens_per_second is None or tokens_left >= cost)
        if fits:
            sent.append((now, cost))
            tokens_left -= cost
        # Resets: until the window is empty, at most a second (OpenAI's "until the rate
        # limit resets to its initial state").
        reset = f"{sent[-1][0] + WINDOW_S - now if sent else 0.0:.3f}s"
        headers = {
            "x-ratelimit-limit-requests": str(per_second * 60),
            "x-ratelimit-remaining-requests": str(per_second - len(sent)),
            "x-ratelimit-reset-requests": reset,
        }
        if tokens_per_second is not None:
            headers["x-ratelimit-limit-tokens"] = str(tokens_per_second * 60)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tokens_left))
            headers["x-ratelimit-reset-tokens"] = reset
        if not fits:
            counts["429"] += 1
            error = {"message": "Rate limit reached", "code": "rate_limit_exceeded"}
            headers["retry-after-ms"] = str(int((sent[0][0] + WINDOW_S - now) * 1000) + 1)
            return web.json_response({"error": error}, status=429, headers=headers)
        counts["admitted"] += 1
        answer = {
            "id": f"c{counts['admitted']}",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": cost - 16, "completion_tokens": 1, "total_tokens": cost},
        }
        return web.json_response(answer, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, counts


@pytest.mark.parametrize(
    ("limits", "tokens_per_second"),
    [
        pytest.param({"rpm": PER_SECOND * 60}, None, id="rpm-in-the-job"),
        pytest.param({"rpm": 100_000, "tpm": 60 * 1_500}, 1_500, id="tpm-bound"),
    ],
)
def test_a_sliding_second_is_never_sent_more_than_it_has_room_for(
    tmp_path: Path, limits: dict[str, int], tokens_per_second: int | None
) -> None:
    rows = [{"text": f"row {i} " + "word " * 40} for i in range(60)]
    job = write_job(
        tmp_path,
        rows,
        request={"max_tokens": 16},
        limits={"concurrency": 16, **limits},
    )
    app, counts = window_server(PER_SECOND, tokens_per_second)
    with serving_app(app) as url:
        result = invoke("run", job, "--base-url", url)
    assert result.exit_code == 0, result.output
    assert counts["429"] == 0
    assert counts["admitted"] == len(rows)
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * len(rows)

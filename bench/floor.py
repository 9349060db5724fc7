"""The floor: a bare worker pool doing a chat job, the least a Python client can spend.

    .venv/bin/python bench/floor.py --base-url http://127.0.0.1:8080/v1 \\
        --input in.parquet --output out.parquet --concurrency 64

polars reads the input's `text` column; a fixed pool of `--concurrency` aiohttp workers
on one `ClientSession` pull row numbers from a queue, build each row's body
(`{"model", "messages": [{"role": "user", "content": text}], "max_tokens"}`), POST it to
`{base_url}/chat/completions` and parse the answer (`choices[0].message.content` and
`usage`). At the end the input is written to Parquet with `status`, `response`, `error`
and the usage's `prompt_tokens` and `completion_tokens`, and it prints
{"rows": ..., "ok": ..., "failed": ...} on stdout, as `bench/baseline.py` does.

No rate limiter, no retries, no journal, no progress, no dedupe: a non-200 answer or a
raised error fails its row. `--rpm` and `--tpm` are accepted, so that the bench can give
every tool the same command line, and ignored: the floor is the cost of sending alone.

JSON is orjson's, both ways: it is the usual choice of someone writing a bulk client
with speed in mind (and `pipeline` itself depends on it), so the floor is not raised by
the standard library's slower encoder. The event loop is asyncio's own (`asyncio.run`),
as a plain script has it. `bench/scenarios.py` runs it as its own process beside
`pipeline run`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import polars as pl

MODEL = "gpt-4o-mini"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
#: Of a refused answer's body, the part kept in `error`.
ERROR_CHARS = 200


@dataclass
class Result:
    """One row's outcome: the answer's text and usage, or why there is none."""

    response: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


async def send_all(
    texts: list[str], *, base_url: str, concurrency: int, max_tokens: int
) -> list[Result]:
    """Every row's result, in the input's order."""
    url = f"{base_url}/chat/completions"
    results = [Result() for _ in texts]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(texts)):
        queue.put_nowait(index)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": texts[index]}],
                "max_tokens": max_tokens,
            }
            results[index] = await send(session, url, orjson.dumps(body))

    # aiohttp's connector opens at most 100 connections by default: one per worker here.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with (
        aiohttp.ClientSession(connector=connector, headers=HEADERS) as session,
        asyncio.TaskGroup() as group,
    ):
        for _ in range(concurrency):
            group.create_task(worker(session))
    return results


async def send(session: aiohttp.ClientSession, url: str, body: bytes) -> Result:
    try:
        async with session.post(url, data=body) as answer:
            raw = await answer.read()
            if answer.status != 200:
                return Result(
                    error=f"HTTP {answer.status}: {raw[:ERROR_CHARS].decode(errors='replace')}"
                )
        parsed: dict[str, Any] = orjson.loads(raw)
        usage = parsed["usage"]
        return Result(
            response=parsed["choices"][0]["message"]["content"],
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
        )
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
        return Result(error=repr(exc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--input", type=Path, required=True, help="Parquet with a `text` column.")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpm", type=int, help="Ignored: the floor has no limiter.")
    parser.add_argument("--tpm", type=int, help="Ignored: the floor has no limiter.")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    rows = pl.read_parquet(args.input)
    results = asyncio.run(
        send_all(
            rows["text"].to_list(),
            base_url=args.base_url,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
        )
    )
    failed = [r.error is not None for r in results]
    rows.with_columns(
        status=pl.Series(["failed" if f else "ok" for f in failed], dtype=pl.String),
        response=pl.Series([r.response for r in results], dtype=pl.String),
        error=pl.Series([r.error for r in results], dtype=pl.String),
        prompt_tokens=pl.Series([r.prompt_tokens for r in results], dtype=pl.Int64),
        completion_tokens=pl.Series([r.completion_tokens for r in results], dtype=pl.Int64),
    ).write_parquet(args.output)
    print(json.dumps({"rows": len(results), "ok": failed.count(False), "failed": sum(failed)}))


if __name__ == "__main__":
    main()

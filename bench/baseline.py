"""The baseline: the same job written the way most people would, with the official SDK.

    .venv/bin/python bench/baseline.py --base-url http://127.0.0.1:8080/v1 \\
        --input in.parquet --output out.parquet --concurrency 32 --rpm 6000

One `AsyncOpenAI` client with the SDK's defaults (two retries), an `asyncio.Semaphore`
for concurrency, `aiolimiter.AsyncLimiter(rpm, 60)` for requests and, with `--tpm`, a
second one charged `len(text) // 4 + max_tokens` per row, and one `asyncio.gather` over
every row of the input's `text` column. A row whose call raised is failed. It writes
the input with `status`, `response` and `error` to Parquet and prints
{"rows": ..., "ok": ..., "failed": ...} on stdout. `bench/scenarios.py` runs it as its
own process. Nothing here is clever, on purpose: it is the script we are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import polars as pl
from aiolimiter import AsyncLimiter
from openai import AsyncOpenAI

MODEL = "gpt-4o-mini"


async def complete_all(
    texts: list[str],
    *,
    base_url: str,
    concurrency: int,
    rpm: int | None,
    tpm: int | None,
    max_tokens: int,
) -> list[str | BaseException | None]:
    """Every row's answer, or the exception its call raised."""
    semaphore = asyncio.Semaphore(concurrency)
    requests = AsyncLimiter(rpm, 60) if rpm else None
    tokens = AsyncLimiter(tpm, 60) if tpm else None

    async with AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=2) as client:

        async def complete(text: str) -> str | None:
            async with semaphore:
                if requests is not None:
                    await requests.acquire()
                if tokens is not None:
                    await tokens.acquire(len(text) // 4 + max_tokens)
                response = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": text}],
                    max_tokens=max_tokens,
                )
                return response.choices[0].message.content

        return await asyncio.gather(*(complete(t) for t in texts), return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--input", type=Path, required=True, help="Parquet with a `text` column.")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--tpm", type=int)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    rows = pl.read_parquet(args.input)
    results = asyncio.run(
        complete_all(
            rows["text"].to_list(),
            base_url=args.base_url,
            concurrency=args.concurrency,
            rpm=args.rpm,
            tpm=args.tpm,
            max_tokens=args.max_tokens,
        )
    )
    failed = [isinstance(r, BaseException) for r in results]
    rows.with_columns(
        status=pl.Series(["failed" if f else "ok" for f in failed]),
        response=pl.Series([None if f else r for f, r in zip(failed, results, strict=True)]),
        error=pl.Series([repr(r) if f else None for f, r in zip(failed, results, strict=True)]),
    ).write_parquet(args.output)
    print(json.dumps({"rows": len(results), "ok": failed.count(False), "failed": sum(failed)}))


if __name__ == "__main__":
    main()

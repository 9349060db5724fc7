"""Issue 4's scenarios from outside: the sample job run as a user would run it, against
a strict server written apart from `pipeline` (bench/strict_server.py).

    make bench BENCH=independent       # about eight minutes

Each scenario starts the server as its own process and runs

    pipeline run jobs/summarise.toml --input T --base-url U --rpm R --tpm T
        --concurrency C --fresh

then prints what the server saw (its own count of admitted requests and tokens over
the span from the first admission to the last answer) and what the output says. The
TPM-bound scenario runs against four servers: tokens counted by o200k_base or by
characters/4, limits enforced over a sliding second or by a one-second bucket. The
memory runs repeat 1,000 distinct rows, which pipeline sends once each and shares, so
5,000,000 rows are read, rendered, journaled and written while ~1,000 requests go out.
Nothing is asserted; the targets are printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "bench" / "strict_server.py"
JOB = REPO / "jobs" / "summarise.toml"
SHORT_ROWS, LONG_ROWS, OVERHEAD_ROWS = 3_000, 360, 20_000
MEMORY_ROWS = (50_000, 5_000_000)
DISTINCT = 1_000
RPM = 6_000  # 100 a second: 3,000 rows take 30 s at best
TPM = 600_000  # 10,000 tokens a second: 360 rows of ~550 tokens take ~20 s at best
UNBOUND = 10**8
CONCURRENCY = 64
LIMIT_S = 600


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    server_rpm: int
    server_tpm: int
    job_rpm: int
    job_tpm: int
    count: str = "o200k"
    window: str = "second"
    fault_rate: float = 0.0
    latency_ms: tuple[float, float] = (20.0, 80.0)


def scenarios() -> list[Scenario]:
    tpm_bound = [
        Scenario("TPM-bound", LONG_ROWS, UNBOUND, TPM, UNBOUND, TPM, count, window)
        for count in ("o200k", "chars4")
        for window in ("second", "bucket")
    ]
    return [
        Scenario("rate-bound", SHORT_ROWS, RPM, UNBOUND, RPM, UNBOUND),
        Scenario("rate-bound", SHORT_ROWS, RPM, UNBOUND, RPM, UNBOUND, window="bucket"),
        *tpm_bound,
        Scenario("misconfigured 4x", SHORT_ROWS, RPM, UNBOUND, 4 * RPM, UNBOUND),
        Scenario("faults 5%", SHORT_ROWS, RPM, UNBOUND, RPM, UNBOUND, fault_rate=0.05),
        # No limits that bind (a bucket: a window of thousands of entries would slow the
        # server down), a fixed 20 ms: the client's own cost.
        *(
            Scenario(
                name,
                rows,
                UNBOUND,
                UNBOUND,
                UNBOUND,
                UNBOUND,
                window="bucket",
                latency_ms=(20.0, 20.0),
            )
            for name, rows in (
                ("overhead", OVERHEAD_ROWS),
                *(("memory", rows) for rows in MEMORY_ROWS),
            )
        ),
    ]


def helper(*args: str) -> Any:
    """Run a table helper in a child and return what it prints (JSON). This process
    never imports polars: the peak RSS wait4() reports for a child is at least what its
    parent had when it forked, and a 5M-row table would be counted in every run."""
    done = subprocess.run(
        [sys.executable, __file__, "--helper", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=LIMIT_S,
    )
    return json.loads(done.stdout)


def write_inputs(folder: Path, wanted: set[int]) -> dict[int, Path]:
    """The sample job's columns (id, title, body): short rows, ~2,400-character ones,
    and the memory runs' rows, 1,000 distinct ones over and over."""
    import polars as pl

    paths = {}
    sizes = {SHORT_ROWS: 60, LONG_ROWS: 2_400, OVERHEAD_ROWS: 60}
    for rows in wanted:
        chars = sizes.get(rows, 60)
        words = "lorem ipsum dolor sit amet " * (chars // 27 + 1)
        ids = pl.int_range(rows, dtype=pl.Int64)
        which = ids if rows in sizes else ids % DISTINCT
        path = folder / f"rows{rows}.parquet"
        pl.select(
            id=ids,
            title=pl.format("Title {}", which),
            body=pl.format("Row {}. {}", which, pl.lit(words)).str.slice(0, chars),
        ).write_parquet(path)
        paths[rows] = path
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(url: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the strict server did not start at {url}")


def run(scenario: Scenario, table: Path, folder: Path) -> str:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            f"--port={port}",
            f"--rpm={scenario.server_rpm}",
            f"--tpm={scenario.server_tpm}",
            f"--count={scenario.count}",
            f"--window={scenario.window}",
            f"--fault-rate={scenario.fault_rate}",
            "--latency-ms",
            *(str(ms) for ms in scenario.latency_ms),
        ],
        stderr=subprocess.DEVNULL,
    )
    stats_url = f"http://127.0.0.1:{port}/stats"
    output = folder / f"{scenario.name.split()[0]}-{port}.parquet"
    try:
        wait_for(stats_url)
        command = [
            *(sys.executable, "-m", "pipeline", "run", str(JOB)),
            *("--input", str(table), "--output", str(output)),
            *("--base-url", f"http://127.0.0.1:{port}/v1"),
            *("--rpm", str(scenario.job_rpm), "--tpm", str(scenario.job_tpm)),
            *("--concurrency", str(CONCURRENCY), "--fresh"),
        ]
        started = time.monotonic()
        child = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Bounded: past LIMIT_S the run is killed (and its rows count as failed).
        deadline = threading.Timer(LIMIT_S, child.kill)
        deadline.start()
        _, status, usage = os.wait4(child.pid, 0)
        deadline.cancel()
        wall = time.monotonic() - started
        with urllib.request.urlopen(stats_url, timeout=5) as answer:
            seen = json.loads(answer.read())
    finally:
        server.terminate()
        server.wait()
    failed: int = helper("failed", str(output), str(scenario.rows))
    first_at = seen.get("first_at")
    startup = f"{first_at - started:>9.2f}" if first_at is not None else f"{'-':>9}"
    span = seen.get("span_s") or float("nan")
    rpm_used = seen.get("admitted", 0) / span / (scenario.server_rpm / 60)
    tpm_used = seen.get("tokens", 0) / span / (scenario.server_tpm / 60)
    used = tpm_used if scenario.server_tpm < UNBOUND else rpm_used
    shown = (
        f"{used:>8.1%}"
        if scenario.server_rpm < UNBOUND or scenario.server_tpm < UNBOUND
        else f"{'-':>8}"
    )
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000 / max(1, seen.get("admitted", 0))
    return (
        f"{scenario.name:<17}{scenario.count:>7}{scenario.window:>8}{scenario.rows:>10,}"
        f"{os.waitstatus_to_exitcode(status):>5}{wall:>8.1f}{shown}"
        f"{seen.get('429', 0):>6}{seen.get('faults', 0):>7}{failed:>7}{cpu_ms:>11.3f}"
        f"{usage.ru_maxrss / 1024:>9.0f}{startup}"
    )


def _failed_rows(output: Path, rows: int) -> int:
    """Rows not ok in the output (a missing row counts as failed)."""
    import polars as pl

    if not output.exists():
        return rows
    frame = pl.read_parquet(output, columns=["status"])
    return rows - int((frame["status"] == "ok").sum())


HEADER = (
    f"{'scenario':<17}{'count':>7}{'limit':>8}{'rows':>10}{'exit':>5}{'wall s':>8}"
    f"{'used':>8}{'429s':>6}{'faults':>7}{'failed':>7}{'CPU ms/req':>11}{'peak MB':>9}"
    f"{'start s':>9}"
)
TARGETS = """
targets: rate-bound and TPM-bound >= 97% of the server's limit, 0 failed, 0 429s;
misconfigured 0 failed and >= 90%; faults 0 failed. `used`: the server's count of what
it admitted (tokens for TPM-bound, requests otherwise) per second from its first
admission to its last answer, over its limit. A sliding-second server admits at most
floor(limit per second / request) requests in any second: with ~550-token requests
against 10,000 tokens a second that is 18 (97.9%), the most any client can use there.
CPU ms/req: the pipeline process's user + system CPU (start-up included) per request
it had admitted; overhead target <= 0.25. peak MB: its peak RSS; memory target: at
5,000,000 rows at most 1.5x that at 50,000. start s: spawn to the server's first
admission (target under 1 s)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names (first word)")
    parser.add_argument("--helper", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.helper:
        what, *rest = args.helper
        if what == "write":
            paths = write_inputs(Path(rest[0]), {int(r) for r in rest[1:]})
            print(json.dumps({rows: str(path) for rows, path in paths.items()}))
        else:
            print(json.dumps(_failed_rows(Path(rest[0]), int(rest[1]))))
        return
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="independent-") as name:
        folder = Path(name)
        chosen = [s for s in scenarios() if wanted is None or s.name.split()[0] in wanted]
        written = helper("write", str(folder), *{str(s.rows) for s in chosen})
        tables = {int(rows): Path(path) for rows, path in written.items()}
        print(HEADER, flush=True)
        for scenario in chosen:
            print(run(scenario, tables[scenario.rows], folder), flush=True)
    print(TARGETS)


if __name__ == "__main__":
    main()

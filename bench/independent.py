"""Issue 4's scenarios from outside: the sample job run as a user would run it, against
a strict server written apart from `pipeline` (bench/strict_server.py).

    make bench BENCH=independent       # about six minutes

Each scenario starts the server as its own process and runs

    pipeline run jobs/summarise.toml --input T --base-url U --rpm R --tpm T
        --concurrency C --fresh

then prints what the server saw (its own count of admitted requests and tokens over
the span from the first admission to the last answer) and what the output says. The
TPM-bound scenario runs against four servers: tokens counted by o200k_base or by
characters/4, limits enforced over a sliding second or by a one-second bucket.
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
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "bench" / "strict_server.py"
JOB = REPO / "jobs" / "summarise.toml"
SHORT_ROWS, LONG_ROWS = 3_000, 360
RPM = 6_000  # 100 a second: 3,000 rows take 30 s at best
TPM = 600_000  # 10,000 tokens a second: 360 rows of ~550 tokens take ~20 s at best
UNBOUND = 10**8
CONCURRENCY = 64
LIMIT_S = 300


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
    ]


def write_inputs(folder: Path) -> dict[int, Path]:
    """The sample job's columns (id, title, body): short rows and ~2,400-character ones."""
    import polars as pl

    paths = {}
    for rows, chars in ((SHORT_ROWS, 60), (LONG_ROWS, 2_400)):
        words = "lorem ipsum dolor sit amet " * (chars // 27 + 1)
        path = folder / f"rows{rows}.parquet"
        pl.DataFrame(
            {
                "id": range(rows),
                "title": [f"Title {i}" for i in range(rows)],
                "body": [f"Row {i}. {words}"[:chars] for i in range(rows)],
            }
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
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - started
        with urllib.request.urlopen(stats_url, timeout=5) as answer:
            seen = json.loads(answer.read())
    finally:
        server.terminate()
        server.wait()
    failed = _failed_rows(output, scenario.rows)
    span = seen.get("span_s") or float("nan")
    rpm_used = seen.get("admitted", 0) / span / (scenario.server_rpm / 60)
    tpm_used = seen.get("tokens", 0) / span / (scenario.server_tpm / 60)
    used = tpm_used if scenario.server_tpm < UNBOUND else rpm_used
    cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000 / max(1, seen.get("admitted", 0))
    return (
        f"{scenario.name:<17}{scenario.count:>7}{scenario.window:>8}{scenario.rows:>7,}"
        f"{os.waitstatus_to_exitcode(status):>5}{wall:>8.1f}{used:>8.1%}"
        f"{seen.get('429', 0):>6}{seen.get('faults', 0):>7}{failed:>7}{cpu_ms:>9.3f}"
    )


def _failed_rows(output: Path, rows: int) -> int:
    """Rows not ok in the output (a missing row counts as failed)."""
    import polars as pl

    if not output.exists():
        return rows
    frame = pl.read_parquet(output, columns=["status"])
    return rows - int((frame["status"] == "ok").sum())


HEADER = (
    f"{'scenario':<17}{'count':>7}{'limit':>8}{'rows':>7}{'exit':>5}{'wall s':>8}"
    f"{'used':>8}{'429s':>6}{'faults':>7}{'failed':>7}{'CPU ms/req':>11}"
)
TARGETS = """
targets: rate-bound and TPM-bound >= 97% of the server's limit, 0 failed, 0 429s;
misconfigured 0 failed and >= 90%; faults 0 failed. `used`: the server's count of what
it admitted (tokens for TPM-bound, requests otherwise) per second from its first
admission to its last answer, over its limit. A sliding-second server admits at most
floor(limit per second / request) requests in any second: with ~550-token requests
against 10,000 tokens a second that is 18 (97.9%), the most any client can use there.
CPU ms/req: the pipeline process's user + system CPU (start-up included) per request."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names (first word)")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="independent-") as name:
        folder = Path(name)
        tables = write_inputs(folder)
        print(HEADER, flush=True)
        for scenario in scenarios():
            if wanted is None or scenario.name.split()[0] in wanted:
                print(run(scenario, tables[scenario.rows], folder), flush=True)
    print(TARGETS)


if __name__ == "__main__":
    main()

"""The nightly run (issue 13): a table answered once, then exported again with 1% of its
rows new or changed. Reports, nothing asserted.

    python bench/incremental.py                    # 1,000,000 rows, about three minutes
    python bench/incremental.py --rows 100000      # a quick look

The first run answers the table; the second finds the input changed, gives every row
whose request was answered before its answer (the reuse pass renders and hashes all of
them), and sends only the new and changed rows: the simulator counts them. Figures for
the second run: requests sent (exactly the new and changed rows), wall time, its
process's CPU (wait4) and peak RSS, and the time from launch to its first request,
which is start-up plus the reuse pass: the planning the issue's target is about (under
10 s of CPU for 1M rows, memory flat).

The table's rows ask 1,000 distinct questions (the memory scenario's shape), so that
the first run takes seconds, not the hours 1M distinct requests would; the pass still
renders and hashes every one of the 1M rows, and looks each up. This process never
imports polars (helper children make the tables): the peak RSS wait4 reports for a
child is at least its parent's when it forked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from scenarios import JOB
from simproc import simulator

REPO = Path(__file__).resolve().parent.parent
#: The first table's distinct requests (as the memory scenario's).
DISTINCT = 1_000
#: Of the second table: rows changed, and rows appended, each as a share of the first.
CHANGED = 0.005
APPENDED = 0.005
#: Every 1/CHANGED-th row is changed: the row ids that are.
CHANGED_EVERY = int(1 / CHANGED)
LIMIT_S = 900.0


def make_tables(first: Path, second: Path, rows: int) -> None:
    """The first export, and the second: 0.5% of its rows changed, 0.5% appended."""
    script = f"""
import polars as pl
rows, appended = {rows}, int({rows} * {APPENDED})
ids = pl.int_range(rows, dtype=pl.Int64)
first = pl.select(id=ids, text=pl.format("Name one colour for item {{}}.", ids % {DISTINCT}))
first.write_parquet({str(first)!r})
edited = pl.when(pl.col("id") % {CHANGED_EVERY} == 7)
second = first.with_columns(
    text=edited.then(pl.format("Name one colour for edited item {{}}.", "id")).otherwise("text")
)
new_ids = pl.int_range(rows, rows + appended, dtype=pl.Int64)
new = pl.select(id=new_ids, text=pl.format("Name one colour for new item {{}}.", new_ids))
pl.concat([second, new]).write_parquet({str(second)!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=LIMIT_S)


def stats(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_sim/stats", timeout=5) as a:
        said: dict[str, float] = json.loads(a.read())
    return said


def run(job: Path, base_url: str, log: Path) -> dict[str, float]:
    """`pipeline run` as a child: its wall time, CPU, peak RSS, exit code, and the time
    from its launch to the first request the simulator counted."""
    args = [sys.executable, "-m", "pipeline", "run", str(job), "--base-url", base_url]
    args += ["--rpm", "1000000", "--tpm", "1000000000", "--concurrency", "64"]
    before = stats(base_url)
    spawned = time.time()
    with log.open("w") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + LIMIT_S
    while (reaped := os.wait4(child.pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            child.kill()
            reaped = os.wait4(child.pid, 0)
            break
        time.sleep(0.05)
    wall = time.time() - spawned
    _, status, usage = reaped
    after = stats(base_url)
    first = after.get("first_request_at")
    return {
        "exit": os.waitstatus_to_exitcode(status),
        "requests": after["requests"] - before["requests"],
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
        "to_first_s": (first - spawned) if first and first > spawned else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "pipeline")], check=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-incremental-") as folder:
        tmp = Path(folder)
        table, first, second = tmp / "in.parquet", tmp / "first.parquet", tmp / "second.parquet"
        make_tables(first, second, rows)
        job = tmp / "job.toml"
        text = JOB.format(
            input=table, output=tmp / "out.parquet", model="gpt-4o-mini", max_tokens=8
        )
        job.write_text(text, encoding="utf-8")
        first.replace(table)
        with simulator(["--latency-ms", "20"], tmp / "sim1.log", cwd=REPO) as url:
            once = run(job, url, tmp / "run1.log")
        second.replace(table)  # tonight's export: another file in its place
        # A fresh simulator, so that its first request is the second run's.
        with simulator(["--latency-ms", "20"], tmp / "sim2.log", cwd=REPO) as url:
            again = run(job, url, tmp / "run2.log")
        said = [line for line in (tmp / "run2.log").read_text().splitlines() if "changed" in line]
    expected = rows // CHANGED_EVERY + int(rows * APPENDED)
    print(
        f"incremental: {rows:,} rows answered, then {CHANGED:.1%} changed and {APPENDED:.1%} "
        f"appended ({expected:,} new or changed requests)"
    )
    print(
        f"{'run':<8}{'exit':>5}{'requests':>10}{'wall s':>8}{'CPU s':>7}{'peak MB':>9}"
        f"{'to first request s':>20}"
    )
    for name, r in (("first", once), ("second", again)):
        print(
            f"{name:<8}{r['exit']:>5.0f}{r['requests']:>10,.0f}{r['wall_s']:>8.1f}"
            f"{r['cpu_s']:>7.1f}{r['peak_mb']:>9.0f}{r['to_first_s']:>20.1f}"
        )
    for line in said:
        print(f"  the second run said: {line.strip()}")
    print(
        f"target: the second run sends exactly {expected:,} requests "
        f"({'met' if again['requests'] == expected else 'NOT met'}); planning over "
        f"{rows:,} rows with 99% reuse under 10 s of CPU: launch to first request "
        f"{again['to_first_s']:.1f} s of wall time (start-up and the reuse pass; the "
        f"whole run took {again['cpu_s']:.1f} s of CPU with its {again['requests']:,.0f} "
        "requests and its output)"
    )


if __name__ == "__main__":
    main()

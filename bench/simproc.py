"""The simulator as its own process, for the benchmarks: started on a free port, killed
on the way out, every wait bounded.

    with simulator(["--latency-ms", "20"], log_path) as base_url:
        ...
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

#: How long the simulator may take to say it listens, and to go once asked.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@contextlib.contextmanager
def simulator(args: Sequence[str], log_path: Path, cwd: Path | None = None) -> Iterator[str]:
    """`pipeline simulate --port 0 ARGS` in its own process; yields its base URL."""
    command = [sys.executable, "-m", "pipeline", "simulate", "--port", "0", *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        yield _listening_url(proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _listening_url(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    """Port 0: the simulator takes a free port and says which in its "listening" line."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        said = log_path.read_text()
        for line in said.splitlines():
            if "listening on " in line:
                return line.split("listening on ", 1)[1].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"the simulator exited with {proc.returncode}: {said}")
        time.sleep(0.05)
    raise RuntimeError(f"the simulator did not say it was listening in {START_TIMEOUT_S} s")

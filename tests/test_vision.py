"""Images in prompts: counted by pixel size as OpenAI documents it, by the client's
estimate and by the simulator (written apart, so each checks the other), end to end."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Server, invoke, read_output, run_job, write_job
from PIL import Image

from pipeline.plan import RunOptions, estimate, make_plan
from pipeline.prompt_images import MAX_IMAGE_BYTES, UNKNOWN_SIZE, image_tokens, load_image
from pipeline.simulator import prompt_images as sim_images
from pipeline.spec import load_job
from pipeline.tokens import estimate_tokens, text_counter

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "jobs" / "describe_images.toml"

# OpenAI's vision guide, "Calculating costs": its worked examples, and what follows
# from its rules for the other model families.
DOCUMENTED = [
    pytest.param((1024, 1024), "high", "gpt-4o", 765, id="1024-square-high-gpt-4o"),
    pytest.param((2048, 4096), "high", "gpt-4o", 1105, id="2048x4096-high-gpt-4o"),
    pytest.param((2048, 4096), "low", "gpt-4o", 85, id="low-is-the-base-gpt-4o"),
    pytest.param((4096, 8192), "low", "gpt-4o", 85, id="low-ignores-size"),
    pytest.param((1024, 1024), "auto", "gpt-4o", 765, id="auto-counts-as-high"),
    pytest.param((512, 512), "high", "gpt-4o", 255, id="small-is-not-scaled-up"),
    pytest.param((1024, 1024), "high", "gpt-4o-mini", 2833 + 4 * 5667, id="gpt-4o-mini-tiles"),
    pytest.param((1024, 1024), "low", "gpt-4o-mini", 2833, id="gpt-4o-mini-low"),
    pytest.param((1024, 1024), "high", "gpt-4.1-mini", 1659, id="1024-square-32x32-patches"),
    pytest.param((1800, 2400), "high", "gpt-4.1-mini", 2353, id="1800x2400-1452-patches"),
    pytest.param((1800, 2400), "high", "gpt-4.1-nano", 3572, id="nano-multiplier"),
]


@pytest.mark.parametrize(("size", "detail", "model", "tokens"), DOCUMENTED)
def test_client_estimate_matches_the_documented_examples(
    size: tuple[int, int], detail: str, model: str, tokens: int
) -> None:
    assert image_tokens(size, detail, model) == tokens


@pytest.mark.parametrize(("size", "detail", "model", "tokens"), DOCUMENTED)
def test_simulator_counts_the_documented_examples(
    size: tuple[int, int], detail: str, model: str, tokens: int
) -> None:
    assert sim_images.tokens_for(size, detail, model) == tokens


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3"])
@pytest.mark.parametrize("detail", ["low", "high"])
def test_client_and_simulator_agree_on_every_size(model: str, detail: str) -> None:
    sizes = [(w, h) for w in (1, 31, 100, 511, 513, 767, 769, 1500, 2047, 2049, 5000) for h in
             (1, 64, 512, 768, 1024, 2000, 4100)]  # fmt: skip

    differ = [
        s
        for s in sizes
        if image_tokens(s, detail, model) != sim_images.tokens_for(s, detail, model)
    ]

    assert not differ


def png(size: tuple[int, int], *, noise: bool = False) -> bytes:
    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else None
    image = image or Image.new("RGB", size, (30, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# --- the sample job ----------------------------------------------------------------------


def test_sample_job_runs_offline_and_the_simulator_counts_what_was_estimated(
    tmp_path: Path,
) -> None:
    out = tmp_path / "described.parquet"

    result = invoke("run", SAMPLE, "--simulate", "--output", out, "--tpm", "100000000")

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    assert frame["status"].to_list() == ["ok"] * 6
    plan = make_plan(load_job(SAMPLE), RunOptions(simulate=True))
    estimated = [
        plan.endpoint.item(plan.renderer.render(row)).tokens
        for row in plan.source.head(6).iter_rows(named=True)
    ]
    counted = frame["prompt_tokens"].to_list()
    local = [i for i, photo in enumerate(frame["photo"]) if not photo.startswith("https://")]
    # A local image's size is known: the estimate is what the server counts, exactly.
    assert [estimated[i] for i in local] == [counted[i] for i in local]
    # A remote one is not fetched: the client assumes the worst case (2048 x 768 at high
    # detail: 8 tiles); the simulator takes it to be 1024 x 768 (4 tiles). The estimate
    # is high by those 4 tiles at gpt-4o-mini's 5667 tokens each, never low.
    (remote,) = set(range(6)) - set(local)
    assert estimated[remote] - counted[remote] == 4 * 5667
    # The estimate command adds up the same per-row estimates.
    assert estimate(plan).prompt_tokens == sum(estimated)
    assert f"{sum(estimated):,} (estimated" in invoke("estimate", SAMPLE).output


def test_an_images_tokens_do_not_depend_on_its_base64_length(tmp_path: Path, sim: Server) -> None:
    (tmp_path / "flat.png").write_bytes(png((600, 600)))
    (tmp_path / "noise.png").write_bytes(png((600, 600), noise=True))
    assert (tmp_path / "noise.png").stat().st_size > 100 * (tmp_path / "flat.png").stat().st_size
    job = write_job(
        tmp_path,
        [{"id": 0, "photo": "flat.png"}, {"id": 1, "photo": "noise.png"}],
        request={"model": "gpt-4o"},
        template={"user": "Describe it.", "images": ["{{ photo }}"]},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    tokens = read_output(tmp_path / "out.parquet")["prompt_tokens"].to_list()
    user = [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]}]
    text = estimate_tokens(user, text_counter("gpt-4o"))
    # 600 x 600 at high detail: 2 x 2 tiles, whatever the bytes.
    assert tokens == [text + 85 + 4 * 170] * 2
    plan = make_plan(load_job(job), RunOptions(base_url=sim.url))
    assert estimate(plan).prompt_tokens == sum(tokens)


def test_a_data_url_in_the_input_is_sent_as_it_is_and_counted_by_size(
    tmp_path: Path, sim: Server
) -> None:
    url = "data:image/png;base64," + base64.b64encode(png((1024, 1024))).decode()
    job = write_job(
        tmp_path,
        [{"id": 0, "photo": url}],
        request={"model": "gpt-4o"},
        template={"user": "What is it?", "images": ["{{ photo }}"], "image_detail": "low"},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    user = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}]}]
    text = estimate_tokens(user, text_counter("gpt-4o"))
    assert read_output(tmp_path / "out.parquet")["prompt_tokens"].to_list() == [text + 85]


# --- rows whose image cannot be sent ------------------------------------------------------


def broken_rows(tmp_path: Path) -> list[dict[str, object]]:
    (tmp_path / "fine.png").write_bytes(png((64, 64)))
    (tmp_path / "text.png").write_text("not an image at all")
    with (tmp_path / "huge.png").open("wb") as handle:
        handle.truncate(MAX_IMAGE_BYTES + 1)  # sparse: takes no disk
    names = ["fine.png", "missing.png", "huge.png", "text.png", "fine.png"]
    return [{"id": i, "photo": name} for i, name in enumerate(names)]


def test_an_image_that_cannot_be_sent_fails_only_its_row_naming_the_path(
    tmp_path: Path, sim: Server
) -> None:
    job = write_job(
        tmp_path,
        broken_rows(tmp_path),
        template={"user": "Describe it.", "images": ["{{ photo }}"]},
        limits={"max_error_rate": 1.0},
    )

    result = run_job(job, sim)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "failed", "failed", "failed", "ok"]
    assert out["error_type"].to_list()[1:4] == ["invalid_row"] * 3
    missing, huge, text = out["error"].to_list()[1:4]
    assert missing == f"cannot read the image {tmp_path / 'missing.png'}: No such file or directory"
    assert huge == f"the image {tmp_path / 'huge.png'} is over 20 MB"
    assert text.startswith(f"{tmp_path / 'text.png'} is not an image Pillow can read")
    assert out["attempts"].to_list()[1:4] == [0, 0, 0]  # never sent
    assert sim.sim.stats.requests == 1  # the two fine rows are one request, shared


def test_estimate_counts_those_rows_as_rejected(tmp_path: Path) -> None:
    job = write_job(
        tmp_path, broken_rows(tmp_path), template={"user": "Hi", "images": ["{{ photo }}"]}
    )

    result = invoke("estimate", job, "--simulate")

    assert result.exit_code == 0, result.output
    assert "3 rows would fail before sending" in result.output


def test_a_remote_image_is_not_fetched_and_estimated_at_the_worst_case() -> None:
    ref = load_image("https://example.com/cat.jpg", Path("."))

    assert (ref.url, ref.size, ref.media_type) == (
        "https://example.com/cat.jpg",
        None,
        "image/jpeg",
    )
    assert image_tokens(ref.size, "high", "gpt-4o") == image_tokens(UNKNOWN_SIZE, "high", "gpt-4o")


# --- the simulator's side --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        pytest.param("data:image/png;base64,bm90IGFuIGltYWdl", "invalid_image_format", id="junk"),
        pytest.param("data:image/png;base64,***", "invalid_image_format", id="not-base64"),
        pytest.param("ftp://example.com/a.png", "invalid_image_url", id="not-http"),
    ],
)
def test_the_simulator_refuses_an_image_it_cannot_read(url: str, code: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}

    with pytest.raises(sim_images.ImageProblem) as caught:
        sim_images.image_part_tokens(part, "gpt-4o")

    assert caught.value.code == code


def test_the_simulator_reads_the_size_from_the_header_alone() -> None:
    raw = png((1500, 900), noise=True)
    url = "data:image/png;base64," + base64.b64encode(raw).decode()

    assert len(url) > 4 * 2**20
    assert sim_images.data_url_size(url) == (1500, 900)
    assert sim_images.image_part_tokens(
        {"image_url": {"url": url, "detail": "high"}}, "gpt-4o"
    ) == (
        85 + 170 * 3 * 2  # 1500 x 900 -> 1280 x 768: 3 x 2 tiles
    )


def test_the_image_module_imports_on_its_own() -> None:
    """pipeline.endpoints imports pipeline.prompt_images: importing it first must not loop."""
    done = subprocess.run(
        [sys.executable, "-c", "import pipeline.prompt_images"], capture_output=True
    )

    assert done.returncode == 0, done.stderr.decode()


def test_validate_shows_each_rows_images_and_its_token_estimate() -> None:
    result = invoke("validate", SAMPLE, "--simulate", "--rows", "1")

    assert result.exit_code == 0, result.output
    assert "[image] images/" in result.output
    assert re.search(r"\(about [\d,]+ prompt tokens\)", result.output), result.output

"""Azure OpenAI end to end: deployment URLs, api-version, the api-key header, Azure's
rate-limit headers and its content filter, against the simulator's Azure routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, invoke, post_json, read_output, serving, write_job

from pipeline.dispatch import SAME_ERROR_HALT
from pipeline.limits import Limiter
from pipeline.simulator import SimConfig, running_in_thread

ROOT = Path(__file__).resolve().parent.parent
KEY = "azure-test-key-0123456789"
AZURE = {"provider": "azure", "api_version": "2024-10-21"}


@pytest.fixture
def keyed() -> Iterator[Server]:
    """A simulator that wants KEY: in Azure's `api-key` header on the Azure routes."""
    with serving(api_key=KEY) as server:
        yield server


def rows(n: int, text: str = "") -> list[dict[str, object]]:
    return [{"id": i, "text": f"row {i} {text}".strip()} for i in range(n)]


def run_azure(job: Path, base_url: str, *args: str, key: str | None = KEY) -> Any:
    env = {"AZURE_OPENAI_API_KEY": key} if key else {}
    return invoke("run", job, "--base-url", base_url, *args, env=env)


CHAT = {"messages": [{"role": "user", "content": "hello"}]}


# --- the sample job and the URL forms ---------------------------------------------------


def test_sample_job_runs_offline_with_every_row_ok(tmp_path: Path) -> None:
    out = tmp_path / "azure.parquet"

    result = invoke(
        "run", ROOT / "jobs" / "azure_summarise.toml", "--simulate", "--output", out,
        "--rpm", "60000", "--tpm", "10000000",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    frame = read_output(out)
    assert frame.height == 50
    assert frame["status"].unique().to_list() == ["ok"]
    assert frame["model"].unique().to_list() == ["gpt-4o-mini"]  # the deployment answered


@pytest.mark.parametrize(
    "suffix",
    [
        pytest.param("", id="bare-host"),
        pytest.param("/v1", id="base-ending-in-v1-as-simulate-gives"),
        pytest.param("/openai", id="base-ending-in-openai"),
    ],
)
def test_requests_reach_the_named_deployment_with_the_api_key(
    tmp_path: Path, keyed: Server, suffix: str
) -> None:
    base = keyed.url.removesuffix("/v1") + suffix
    job = write_job(tmp_path, rows(5), request={**AZURE, "deployment": "summariser-prod"})

    result = run_azure(job, base)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 5
    # The simulator answers with the deployment from the URL, not the body's model.
    assert out["model"].unique().to_list() == ["summariser-prod"]
    assert keyed.sim.stats.ok == 5


def test_the_v1_api_takes_the_model_from_the_body(tmp_path: Path, keyed: Server) -> None:
    base = keyed.url.removesuffix("/v1") + "/openai/v1"
    job = write_job(tmp_path, rows(3), request=AZURE)

    result = run_azure(job, base)

    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out.parquet")["model"].unique().to_list() == ["gpt-4o-mini"]


def test_embeddings_go_to_the_deployment_too(tmp_path: Path, keyed: Server) -> None:
    job = write_job(
        tmp_path,
        rows(4),
        request={**AZURE, "endpoint": "embeddings", "model": "text-embedding-3-small"},
    )

    result = run_azure(job, keyed.url)

    assert result.exit_code == 0, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 4
    assert out["embedding"].list.len().to_list() == [1536] * 4


# --- what Azure refuses, and how the run takes it --------------------------------------


def test_a_wrong_key_halts_the_run_with_azures_401(tmp_path: Path, keyed: Server) -> None:
    job = write_job(tmp_path, rows(3), request=AZURE)

    result = run_azure(job, keyed.url, key="not-the-key-at-all")

    assert result.exit_code == 4, result.output
    assert "authentication failed (Access denied due to invalid subscription key" in result.output
    assert "not-the-key-at-all" not in result.output


@pytest.mark.parametrize(
    ("query", "status", "code", "message"),
    [
        pytest.param("", 404, "404", "Resource not found", id="no-api-version"),
        pytest.param(
            "?api-version=latest", 400, "BadRequest", "API version not supported", id="bad-version"
        ),
    ],
)
def test_the_api_version_is_required(
    keyed: Server, query: str, status: int, code: str, message: str
) -> None:
    url = f"{keyed.url}/openai/deployments/gpt-4o-mini/chat/completions{query}"

    got, body, headers = post_json(url, CHAT, {"api-key": KEY})

    assert got == status
    assert body == {"error": {"code": code, "message": message}}
    assert "apim-request-id" in headers


def test_a_wrong_base_url_halts_with_a_hint_for_azure(tmp_path: Path, sim: Server) -> None:
    """Azure answers any path it does not serve with 404 "Resource not found"."""
    job = write_job(tmp_path, rows(2), request=AZURE)

    result = run_azure(job, sim.url + "/openai/v2", key=None)

    assert result.exit_code == 4, result.output
    assert "(Resource not found)" in result.output
    assert "https://<resource>.openai.azure.com and a valid `api_version`" in result.output


def test_an_unknown_deployment_halts_naming_request_deployment(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, [{"id": 0, "text": "x <<sim:404model>>"}], request=AZURE)

    result = run_azure(job, sim.url, key=None)

    assert result.exit_code == 4, result.output
    assert "The API deployment for this resource does not exist" in result.output
    assert "request.deployment" in result.output


def test_rate_limit_headers_are_azures_remaining_only(keyed: Server) -> None:
    url = f"{keyed.url}/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"

    status, body, headers = post_json(url, CHAT, {"api-key": KEY})

    assert status == 200
    assert headers["x-ratelimit-remaining-requests"] == "-1"  # no limit set: unknown
    assert headers["x-ratelimit-remaining-tokens"] == "-1"
    assert not [h for h in headers if h.lower().startswith(("x-ratelimit-limit", "openai-"))]
    assert body["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False
    assert body["choices"][0]["content_filter_results"]["violence"]["severity"] == "safe"


def test_remaining_counts_down_with_a_limit_and_a_429_says_it_azures_way() -> None:
    with running_in_thread(SimConfig(rpm=2)) as (base, _):
        url = f"{base}/openai/deployments/d/chat/completions?api-version=2024-10-21"
        seen = [post_json(url, CHAT, {}) for _ in range(3)]

    assert [s for s, _, _ in seen] == [200, 200, 429]
    assert [h["x-ratelimit-remaining-requests"] for _, _, h in seen[:2]] == ["1", "0"]
    _, body, headers = seen[2]
    assert body["error"]["code"] == "429"
    assert body["error"]["message"].startswith(
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
        "2024-10-21 have exceeded call rate limit"
    )
    assert float(headers["retry-after"]) > 0


def test_the_client_ignores_azures_unknown_and_stale_remaining_counts() -> None:
    """-1 means unknown; without a limit header a count cannot be turned into a wait
    (Azure's are cached for seconds, too): only a 429's retry-after makes the run wait."""
    limiter = Limiter(rpm=None, tpm=None)
    for remaining in ("-1", "0"):
        limiter.observe(
            {"x-ratelimit-remaining-requests": remaining, "x-ratelimit-remaining-tokens": "0"},
            tokens=500,
        )
    assert limiter.paused_for == 0
    assert (limiter.rpm, limiter.tpm) == (None, None)


def test_an_azure_429_is_waited_out_and_the_row_succeeds(tmp_path: Path, sim: Server) -> None:
    job = write_job(tmp_path, [{"id": 0, "text": "x <<sim:429:2>>"}, *rows(3)[1:]], request=AZURE)

    result = run_azure(job, sim.url, key=None)

    assert result.exit_code == 0, result.output
    assert read_output(tmp_path / "out.parquet")["status"].to_list() == ["ok"] * 3
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    assert summary["rate_limited"] == 2


# --- the content filter ----------------------------------------------------------------


def test_a_filtered_prompt_fails_only_its_row_and_never_halts_the_run(
    tmp_path: Path, sim: Server
) -> None:
    filtered = SAME_ERROR_HALT + 5  # more in a row than would halt a repeated 400
    data = [*rows(filtered, "<<sim:content_filter>>"), *rows(3)]
    job = write_job(tmp_path, [{**r, "id": i} for i, r in enumerate(data)], request=AZURE)

    result = run_azure(job, sim.url, "--concurrency", "1", key=None)

    assert result.exit_code == 1, result.output  # rows failed; the run was not halted
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed"] * filtered + ["ok"] * 3
    failed = out.filter(out["status"] == "failed")
    assert failed["error_type"].unique().to_list() == ["content_filter"]
    assert failed["http_status"].unique().to_list() == [400]
    assert failed["attempts"].unique().to_list() == [1]  # not retried
    error = failed["error"][0]
    assert error.startswith(
        "the provider's content filter refused this row's prompt (violence: high); "
        "only this row fails"
    )


def test_the_same_repeated_400_does_halt(tmp_path: Path, sim: Server) -> None:
    """The contrast: a 400 that is not about the row's content stops the run."""
    data = rows(SAME_ERROR_HALT + 5, "<<sim:400>>")
    job = write_job(tmp_path, data, request=AZURE)

    result = run_azure(job, sim.url, "--concurrency", "1", key=None)

    assert result.exit_code == 4, result.output
    assert f"the last {SAME_ERROR_HALT} rows all failed with the same error" in result.output


def test_a_filtered_answer_fails_its_row_saying_so(tmp_path: Path, sim: Server) -> None:
    job = write_job(
        tmp_path, [{"id": 0, "text": "x <<sim:filtered>>"}, *rows(3)[1:]], request=AZURE
    )

    result = run_azure(job, sim.url, key=None)

    assert result.exit_code == 1, result.output
    out = read_output(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["failed", "ok", "ok"]
    row = out.row(0, named=True)
    assert row["error_type"] == "content_filter"
    assert row["error"].startswith("the provider's content filter withheld the answer")
    assert row["finish_reason"] == "content_filter"
    assert row["response"] is None
    assert row["http_status"] == 200
    assert row["completion_tokens"] > 0  # generated, then withheld: billed


def test_responses_on_azure_needs_the_v1_api_base_url(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        [{"text": "hi"}],
        request={"provider": "azure", "endpoint": "responses", "model": "gpt-4.1-mini"},
    )

    result = invoke("validate", job, "--base-url", "https://example.openai.azure.com")

    assert result.exit_code == 2
    assert "/openai/v1" in result.output

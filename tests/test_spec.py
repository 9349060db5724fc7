"""The job file: validation messages a person can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import SpecError
from pipeline.spec import load_job

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[input]
path = "in.csv"
[request]
model = "gpt-4o-mini"
[template]
user = "{{ text }}"
"""


def write(tmp_path: Path, text: str) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(text)
    return job


def test_minimal_job_gets_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, MINIMAL))

    assert job.name == "job"
    assert job.input.path == tmp_path / "in.csv"
    assert job.limits.concurrency == 16
    assert job.request.kind == "chat.completions"
    assert job.template.parts() == [("user", "{{ text }}")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            MINIMAL.replace('model = "gpt-4o-mini"', 'model = "m"\ntemprature = 0.2'),
            "unknown key `request.temprature`; did you mean `temperature`?",
            id="typo-in-request",
        ),
        pytest.param(
            MINIMAL + "[limit]\nrpm = 5\n",
            "unknown key `limit`; did you mean `limits`?",
            id="typo-in-table-name",
        ),
        pytest.param(
            MINIMAL.replace('model = "gpt-4o-mini"', ""),
            "`request.model` is required",
            id="missing",
        ),
        pytest.param(
            MINIMAL + "[limits]\nrpm = 0\n",
            "`limits.rpm`: Input should be greater than 0",
            id="rpm-0",
        ),
        pytest.param(
            MINIMAL.replace('user = "{{ text }}"', 'system = "hi"'),
            "the template needs `user`",
            id="no-user-template",
        ),
        pytest.param(
            MINIMAL.replace("[request]", '[request]\nresponse_format = "json_schema"'),
            "needs a [request.json_schema] table",
            id="schema-format-without-schema",
        ),
        pytest.param("[input\n", "not valid TOML", id="bad-toml"),
    ],
)
def test_invalid_jobs_say_what_and_how_to_fix(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_job(write(tmp_path, text))

    assert expected in str(caught.value)
    assert str(tmp_path / "job.toml") in str(caught.value)


def test_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="job file not found"):
        load_job(tmp_path / "nope.toml")


def test_fingerprint_names_the_part_that_changed(tmp_path: Path) -> None:
    before = load_job(write(tmp_path, MINIMAL)).fingerprint()
    after = load_job(write(tmp_path, MINIMAL.replace("{{ text }}", "{{ text }}!"))).fingerprint()

    assert [k for k in before if before[k] != after[k]] == ["template"]


@pytest.mark.parametrize("name", ["summarise.toml", "extract.toml"])
def test_sample_jobs_load(name: str) -> None:
    job = load_job(ROOT / "jobs" / name)

    assert job.input.path.exists()
    if job.request.json_schema is not None:
        assert job.json_schema() is not None

"""Answers against the job's expectations: JSON, schemas, refusals, lenient JSON."""

from __future__ import annotations

import orjson
import pytest

from pipeline.errors import ResponseInvalid
from pipeline.parse import AnswerCheck
from pipeline.records import Answer, Usage

SCHEMA = {
    "type": "object",
    "properties": {"topics": {"type": "array", "items": {"type": "string"}}},
    "required": ["topics"],
    "additionalProperties": False,
}


def answer(text: str | None, finish_reason: str = "stop") -> Answer:
    return Answer(text, finish_reason, Usage(), None, None)


def test_a_matching_answer_passes_unchanged() -> None:
    given = answer('{"topics": ["a", "b"]}')

    assert AnswerCheck(SCHEMA)(given) is given


def test_raw_control_characters_in_strings_are_read_and_normalised() -> None:
    """llama-cpp-python's JSON grammar lets a raw newline into a string."""
    checked = AnswerCheck(SCHEMA)(answer('{"topics": ["le marché\n", "b\tc"]}'))

    assert checked.text is not None
    assert orjson.loads(checked.text) == {"topics": ["le marché\n", "b\tc"]}


@pytest.mark.parametrize(
    ("text", "finish_reason", "message"),
    [
        ('{"topics": ["a"', "length", "not valid JSON (cut off by max_tokens)"),
        ('{"topics": "a"}', "stop", "does not match the schema at topics"),
        ("[1, 2]", "stop", "does not match the schema at (root)"),
    ],
)
def test_answers_that_do_not_fit_fail_saying_why(
    text: str, finish_reason: str, message: str
) -> None:
    with pytest.raises(ResponseInvalid, match=message.replace("(", r"\(").replace(")", r"\)")):
        AnswerCheck(SCHEMA)(answer(text, finish_reason))


def test_json_object_mode_needs_an_object() -> None:
    with pytest.raises(ResponseInvalid, match="not an object"):
        AnswerCheck(None, json_object=True)(answer("[1]"))

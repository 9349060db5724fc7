"""Templates: sandboxed, strict about columns, and row values stay data."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.errors import NullValue, RenderFailed, RenderLimit, TemplateError
from pipeline.render import MAX_RENDER_CHARS, Renderer
from pipeline.spec import TemplateSpec
from pipeline.tokens import bytes_over_four, estimate_tokens


def renderer(columns: tuple[str, ...] = ("id", "text"), **spec: object) -> Renderer:
    return Renderer(TemplateSpec.model_validate(spec or {"user": "{{ text }}"}), columns)


def test_system_and_user_messages() -> None:
    r = renderer(system="Be brief.", user="Text: {{ text }}")

    assert r.messages({"id": 1, "text": "hi"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Text: hi"},
    ]


def test_missing_column_lists_the_inputs_columns_and_the_nearest() -> None:
    with pytest.raises(TemplateError) as caught:
        renderer(user="{{ txt }}")

    message = str(caught.value)
    assert "column `txt` used in the template is not in the input" in message
    assert "did you mean `text`?" in message
    assert "The input has: id, text" in message


def test_syntax_error_names_the_template_and_line() -> None:
    with pytest.raises(TemplateError, match=r"template `user`, line 2"):
        renderer(user="ok\n{{ text ")


def test_loop_variables_are_not_taken_for_columns() -> None:
    r = renderer(user="{% for w in text.split() %}[{{ w }}]{% endfor %}")

    assert r.messages({"id": 1, "text": "a b"})[0]["content"] == "[a][b]"


def test_nulls_render_empty_unless_the_job_says_fail() -> None:
    assert renderer(user="<{{ text }}>").messages({"text": None})[0]["content"] == "<>"
    with pytest.raises(NullValue, match="`text` is null"):
        renderer(user="{{ text }}", nulls="fail").messages({"text": None})


def test_sandbox_blocks_reaching_python_internals() -> None:
    r = renderer(user="{{ text.__class__.__mro__[1].__subclasses__() }}")

    with pytest.raises(RenderFailed):
        r.messages({"text": "x"})


@given(st.text())
def test_row_values_are_data_never_template_code(value: str) -> None:
    # Framed: a prompt that renders blank is a row failure, not a message.
    out = renderer(user="<{{ text }}>").messages({"id": 0, "text": value})

    assert out[0]["content"] == f"<{value}>"


def test_token_estimate_rounds_up_and_counts_non_ascii_bytes() -> None:
    ascii_ = estimate_tokens([{"role": "user", "content": "a" * 400}], bytes_over_four)
    wide = estimate_tokens([{"role": "user", "content": "é" * 400}], bytes_over_four)

    assert ascii_ >= 100
    assert wide > ascii_


def test_a_value_counts_once_against_the_render_size_limit() -> None:
    # A value of 60% of the limit is well within it: counted once, not once as the
    # expression's value and again as the text it becomes.
    text = "x" * (MAX_RENDER_CHARS * 6 // 10)
    prompt = renderer().render({"id": 1, "text": text})
    assert prompt.messages[-1]["content"] == text


#: Templates that only put columns into text: rendered without Jinja (render._Plain).
PLAIN_TEMPLATES = [
    pytest.param("{{ text }}", id="one-column"),
    pytest.param("Title: {{ id }}\n\n{{text}}\n", id="lines-and-trailing-newline"),
    pytest.param("{{ id }}{{ text }}", id="adjacent-columns"),
    pytest.param("{% raw %}{{ id }}{% endraw %} {{ text }}", id="raw-block"),
    pytest.param("{{ text }} {# a comment #} end", id="comment"),
    pytest.param("  {{- text -}}  \n{{ id }}", id="whitespace-control"),
    # Not plain: a name Jinja provides itself, not a column; Jinja renders it.
    pytest.param("{{ self }} {{ text }}", id="jinja-own-name"),
]
#: Values of every kind a polars row can hold, and a few more.
VALUES = [
    pytest.param("plain words", id="str"),
    pytest.param("café {{ id }} {% x %}", id="str-with-template-syntax"),
    pytest.param(7, id="int"),
    pytest.param(0.1 + 0.2, id="float"),
    pytest.param(True, id="bool"),
    pytest.param([1, "a", None], id="list"),
    pytest.param({"k": [1.5]}, id="dict"),
    pytest.param(datetime.date(2024, 2, 29), id="date"),
    pytest.param(decimal.Decimal("1.10"), id="decimal"),
    pytest.param(b"\x00bytes", id="bytes"),
]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("template", PLAIN_TEMPLATES)
def test_a_plain_template_renders_what_jinja_renders(template: str, value: Any) -> None:
    jinja = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    row = {"id": 12, "text": value}

    out = renderer(user=f"<{template}>").messages(row)[0]["content"]

    assert out == jinja.from_string(f"<{template}>").render(row)


def test_a_plain_template_keeps_the_render_size_limit() -> None:
    with pytest.raises(RenderLimit, match="past the render size limit"):
        renderer(user="Text: {{ text }}").render({"id": 1, "text": "x" * MAX_RENDER_CHARS})

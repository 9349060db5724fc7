"""Row -> messages, through sandboxed Jinja2 templates.

    renderer = Renderer(job.template, columns=("id", "title", "body"))
    renderer.messages({"id": 1, "title": "Hi", "body": None})
    # [{"role": "system", ...}, {"role": "user", "content": "Title: Hi\\n\\n"}]

Templates are compiled once. Row values are data: they are passed to the template as
variables and never parsed as template code, and the sandbox keeps templates from
reaching Python internals. A column the template uses that the input lacks is an error
before any request is sent.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.errors import TemplateError
from pipeline.spec import TemplateSpec


@dataclass(frozen=True, slots=True)
class Prompt:
    """One row, rendered: what an endpoint builds its part of a request from."""

    #: {"role": ..., "content": str}, in order.
    messages: list[dict[str, Any]]
    #: Image references (URL, data URL or local path) for the last user message.
    images: tuple[str, ...] = ()
    #: A local file to upload (audio transcription).
    file: str | None = None


class NullValue(Exception):
    """A column the template uses is null in this row, and the job says fail."""

    def __init__(self, column: str) -> None:
        super().__init__(f'column `{column}` is null in this row (template.nulls = "fail")')
        self.column = column


class RenderFailed(Exception):
    """The template raised for this row (a filter on a bad value, say)."""


def _environment() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


class Renderer:
    def __init__(self, spec: TemplateSpec, columns: Sequence[str]) -> None:
        env = _environment()
        self._fail_on_null = spec.nulls == "fail"
        used: set[str] = set()

        def compile(text: str, name: str) -> Template:
            ast = _parse(env, text, name)
            used.update(meta.find_undeclared_variables(ast) - _locals(ast))
            return env.from_string(ast)

        self._parts = [
            (role, compile(text, role if spec.messages is None else f"messages[{index}]"))
            for index, (role, text) in enumerate(spec.parts())
        ]
        self._images = [compile(t, f"images[{i}]") for i, t in enumerate(spec.images)]
        self._file = compile(spec.file, "file") if spec.file is not None else None
        _check_columns(used, columns)
        #: The input columns the templates read, in input order.
        self.columns = tuple(c for c in columns if c in used)

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self.render(row).messages

    def render(self, row: Mapping[str, Any]) -> Prompt:
        """The row's messages, images and file; raise NullValue or RenderFailed."""
        values = self._values(row)
        try:
            messages: list[dict[str, Any]] = [
                {"role": role, "content": t.render(values)} for role, t in self._parts
            ]
            images = tuple(i for t in self._images if (i := t.render(values).strip()))
            file = self._file.render(values).strip() if self._file is not None else None
        except (UndefinedError, SecurityError, TypeError, ValueError) as exc:
            raise RenderFailed(f"the template failed on this row: {exc}") from None
        if self._file is not None and not file:
            raise RenderFailed("the `file` template rendered an empty path")
        return Prompt(messages, images, file)

    def _values(self, row: Mapping[str, Any]) -> dict[str, Any]:
        values = {c: row[c] for c in self.columns}
        for column, value in values.items():
            if value is None:
                if self._fail_on_null:
                    raise NullValue(column)
                values[column] = ""
        return values


def _parse(env: ImmutableSandboxedEnvironment, text: str, name: str) -> nodes.Template:
    try:
        return env.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"template `{name}`, line {exc.lineno}: {exc.message}. "
            "Jinja2 syntax: {{ column }} inserts a value, {% if column %}...{% endif %} a condition"
        ) from None


def _locals(ast: nodes.Template) -> set[str]:
    """Names the template assigns itself ({% set %}, loop variables): not columns."""
    return {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}


def _check_columns(used: set[str], columns: Sequence[str]) -> None:
    missing = sorted(used - set(columns))
    if not missing:
        return
    column = missing[0]
    near = difflib.get_close_matches(column, columns, n=1)
    hint = f"; did you mean `{near[0]}`?" if near else ""
    others = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
    raise TemplateError(
        f"column `{column}`{others} used in the template is not in the input{hint} "
        f"The input has: {', '.join(columns)}"
    )

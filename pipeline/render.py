"""Row -> messages, through sandboxed Jinja2 templates.

    renderer = Renderer(job.template, columns=("id", "title", "body"))
    renderer.messages({"id": 1, "title": "Hi", "body": None})
    # [{"role": "system", ...}, {"role": "user", "content": "Title: Hi\\n\\n"}]

Templates are compiled once; one that only puts columns into text (`Title: {{ title }}`)
is rendered by joining its pieces, the same text Jinja would give, at a twelfth of the
cost. Row values are data: they are passed to the template as
variables and never parsed as template code, and the sandbox keeps templates from
reaching Python internals. A column the template uses that the input lacks is an error
before any request is sent.

A template is code a user wrote, and it runs once per row: a loop inside a loop, a string
multiplied by a billion, would hold the run (and Ctrl-C) for hours. Every render has a
time and a size limit (MAX_RENDER_S, MAX_RENDER_CHARS); past either the row fails with
`RenderLimit`, saying the limit and how much was produced. Loops look at the clock as
they go, and `*`, `**`, `%` and the filters that pad are checked before they allocate.
"""

from __future__ import annotations

import difflib
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError, TemplateAssertionError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from pipeline.errors import NullValue, RenderFailed, RenderLimit, TemplateError
from pipeline.records import Prompt
from pipeline.spec import TemplateSpec

#: A rendered row longer than this is a runaway template, not a prompt: the largest
#: context windows (a million tokens) hold about four million characters.
MAX_RENDER_CHARS = 4_000_000
#: Real templates render a row in well under a millisecond; a second is a runaway loop.
#: It also bounds how long Ctrl-C can wait for a render to give back its thread.
MAX_RENDER_S = 1.0
#: Loop steps between two looks at the clock: cheap, and a few microseconds apart.
CLOCK_EVERY = 64
#: `**` results beyond this many bits (about 300,000 digits) are refused before computing.
MAX_POWER_BITS = 1_000_000
#: The filter every `{% for %}` loop's sequence is passed through, to count its steps.
_LOOP_FILTER = "__pipeline_loop"
#: The filter every `~` concatenation goes through, to count its size before joining.
_CONCAT_FILTER = "__pipeline_concat"
#: Filters whose integer arguments are widths: the result is at least that long.
_WIDTH_FILTERS = ("center", "indent", "truncate", "wordwrap")
#: Widths and precisions in a %-format string (`%999999999s`).
_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?")


class _Budget(threading.local):
    """The current row's render: when it must end, and what it has produced so far."""

    deadline = math.inf
    chars = 0
    steps = 0


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with a time and size budget per render."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            finalize=self._counted,
        )
        self.budget = _Budget()
        for name in _WIDTH_FILTERS:
            self.filters[name] = _width_checked(self, name, self.filters[name])
        self.filters["format"] = _format_checked(self, self.filters["format"])
        self.filters["replace"] = _replace_checked(self, self.filters["replace"])
        self.filters["join"] = _join_checked(self, self.filters["join"])
        self.filters[_LOOP_FILTER] = self._loop
        self.filters[_CONCAT_FILTER] = self._concat

    def start(self) -> None:
        self.budget.deadline = time.monotonic() + MAX_RENDER_S
        self.budget.chars = self.budget.steps = 0

    def tick(self) -> None:
        budget = self.budget
        budget.steps += 1
        if budget.steps % CLOCK_EVERY == 0 and time.monotonic() > budget.deadline:
            raise RenderLimit(
                f"the template ran past the render time limit ({MAX_RENDER_S:g} s) on this "
                f"row, after {budget.steps:,} loop steps and {budget.chars:,} characters: "
                "a loop inside a loop? Render limits: "
                f"{MAX_RENDER_S:g} s and {MAX_RENDER_CHARS:,} characters a row"
            )

    def produced(self, chars: int) -> None:
        self.budget.chars += chars
        if self.budget.chars > MAX_RENDER_CHARS:
            raise RenderLimit(
                f"the template produced {self.budget.chars:,} characters on this row, past "
                f"the render size limit ({MAX_RENDER_CHARS:,} characters a row)"
            )

    def would_make(self, size: float, what: str) -> None:
        if size > MAX_RENDER_CHARS:
            raise RenderLimit(
                f"{what} would make {size:,.0f} characters or items on this row, past the "
                f"render size limit ({MAX_RENDER_CHARS:,} a row)"
            )

    def _counted(self, value: Any) -> Any:
        """Every `{{ ... }}` is a step; its size is counted once, as a chunk of `_run`."""
        self.tick()
        return value

    def _loop(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.tick()
            yield item

    def _concat(self, parts: list[Any]) -> str:
        self.tick()
        texts = [str(p) for p in parts]
        self.would_make(sum(map(len, texts)), "`~`")
        return "".join(texts)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.tick()
        if isinstance(getattr(__obj, "__self__", None), str):  # "x".center(10**9), .zfill
            __self.would_make(max(_ints(args, kwargs), default=0), f"`.{__obj.__name__}()`")
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        if operator == "+" and isinstance(left, str | list | tuple) and hasattr(right, "__len__"):
            self.would_make(len(left) + len(right), "`+`")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and _is_int(n):
                    self.would_make(len(seq) * n, "`*`")
        elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1:
            if right * math.log2(abs(left)) > MAX_POWER_BITS:
                raise RenderLimit(
                    f"`{left} ** {right}` is a number of more than {MAX_POWER_BITS:,} bits: "
                    "past the render limits"
                )
        elif operator == "%" and isinstance(left, str):
            _check_percent(self, left)
        return super().call_binop(context, operator, left, right)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Iterator[int]:
    return (v for v in (*args, *kwargs.values()) if _is_int(v))


def _check_percent(env: _Environment, text: str) -> None:
    for width, precision in _PERCENT_WIDTH.findall(text):
        env.would_make(max(int(width or 0), int(precision or 0)), "a %-format width")


def _width_checked(env: _Environment, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def checked(*args: Any, **kwargs: Any) -> Any:
        env.would_make(max(_ints(args, kwargs), default=0), f"the `{name}` filter")
        return fn(*args, **kwargs)

    return checked


def _join_checked(env: _Environment, fn: Callable[..., Any]) -> Callable[..., Any]:
    def checked(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> Any:
        if isinstance(value, Sequence) and isinstance(d, str):
            env.would_make(len(d) * len(value), "the `join` filter")
        return fn(eval_ctx, value, d, attribute)

    checked.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
    return checked


def _format_checked(env: _Environment, fn: Callable[..., Any]) -> Callable[..., Any]:
    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            _check_percent(env, value)
        return fn(value, *args, **kwargs)

    return checked


def _replace_checked(env: _Environment, fn: Callable[..., Any]) -> Callable[..., Any]:
    def checked(eval_ctx: Any, value: Any, old: Any, new: Any, count: int | None = None) -> Any:
        text, old_s, new_s = str(value), str(old), str(new)
        times = (len(text) + 1 if not old_s else text.count(old_s)) if count is None else count
        env.would_make(len(text) + max(times, 0) * len(new_s), "the `replace` filter")
        return fn(eval_ctx, value, old, new, count)

    checked.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
    return checked


def _environment() -> _Environment:
    return _Environment()


class Renderer:
    def __init__(self, spec: TemplateSpec, columns: Sequence[str]) -> None:
        self._env = env = _environment()
        self._fail_on_null = spec.nulls == "fail"
        used: set[str] = set()

        def compile(text: str, name: str) -> _Compiled:
            ast = _parse(env, text, name)
            try:
                _check_tests(env, ast)
                names = meta.find_undeclared_variables(ast) - _locals(ast)
                used.update(names)
                plain = _plain(ast, names)
                return plain if plain is not None else env.from_string(_guard_loops(ast))
            except TemplateAssertionError as exc:  # an unknown filter or test
                raise _unknown_name(env, exc, name) from None

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
        """The row's messages, images and file; raise NullValue or RenderFailed
        (RenderLimit past the render limits)."""
        values = self._values(row)
        self._env.start()
        try:
            messages: list[dict[str, Any]] = [
                {"role": role, "content": self._run(t, values)} for role, t in self._parts
            ]
            images = tuple(i for t in self._images if (i := self._run(t, values).strip()))
            file = self._run(self._file, values).strip() if self._file is not None else None
        except RenderFailed:
            raise
        except RecursionError:
            raise RenderFailed(
                "the template failed on this row: a macro or recursive loop calls itself "
                "without end"
            ) from None
        except Exception as exc:  # the template is the user's code: any error is the row's
            raise RenderFailed(f"the template failed on this row: {_described(exc)}") from None
        if self._file is not None and not file:
            raise RenderFailed("the `file` template rendered an empty path")
        if self._file is None and not images and _blank(messages):
            raise RenderFailed(
                "the prompt is empty: the user message rendered to nothing but whitespace "
                f"(the columns it uses, {', '.join(self.columns) or 'none'}, are blank in this "
                "row); a blank request is not sent"
            )
        return Prompt(messages, images, file)

    def _run(self, template: _Compiled, values: Mapping[str, Any]) -> str:
        """Render chunk by chunk, counting: a huge output is stopped as it grows."""
        chunks = []
        if isinstance(template, _Plain):
            for piece in template.pieces:
                # As Jinja writes `{{ column }}` without autoescape: str() of the value.
                chunk = piece if isinstance(piece, str) else str(values[piece.name])
                self._env.produced(len(chunk))
                chunks.append(chunk)
            return "".join(chunks)
        for chunk in template.generate(values):
            self._env.produced(len(chunk))
            chunks.append(chunk)
        return "".join(chunks)

    def _values(self, row: Mapping[str, Any]) -> dict[str, Any]:
        values = {c: row[c] for c in self.columns}
        for column, value in values.items():
            if value is None:
                if self._fail_on_null:
                    raise NullValue(column)
                values[column] = ""
        return values


@dataclass(frozen=True, slots=True)
class _Column:
    """`{{ name }}` in a plain template: the row's value of that column."""

    name: str


@dataclass(frozen=True, slots=True)
class _Plain:
    """A template that only puts columns into text (`Title: {{ title }}`), the usual
    kind: rendered by joining its pieces, without Jinja. Jinja's render of a row costs
    ~12 us (a context, its generator; the sandbox's hooks), a third of preparing a
    400-character row, against ~1 us for this (measured: 20,000 such rows in-process).
    What it produces is what Jinja produces: the same text, str() of each value."""

    pieces: tuple[str | _Column, ...]


#: A compiled template: Jinja's, or a plain one that needs none.
_Compiled = Template | _Plain


def _plain(ast: nodes.Template, columns: set[str]) -> _Plain | None:
    """The template as plain pieces if it is only text and `{{ column }}`s, else None.
    `columns`: the names it reads from the row (not `self`, which Jinja provides)."""
    pieces: list[str | _Column] = []
    for node in ast.body:
        if not isinstance(node, nodes.Output):
            return None
        for child in node.nodes:
            if isinstance(child, nodes.TemplateData):
                pieces.append(child.data)
            elif isinstance(child, nodes.Name) and child.name in columns:
                pieces.append(_Column(child.name))
            else:
                return None
    return _Plain(tuple(pieces))


def _parse(env: ImmutableSandboxedEnvironment, text: str, name: str) -> nodes.Template:
    try:
        return env.parse(text)
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"template `{name}`, line {exc.lineno}: {exc.message}. "
            "Jinja2 syntax: {{ column }} inserts a value, {% if column %}...{% endif %} a condition"
        ) from None


def _check_tests(env: _Environment, ast: nodes.Template) -> None:
    """Jinja2 finds an unknown test only when it runs; here it is found for every row."""
    for test in ast.find_all(nodes.Test):
        if test.name not in env.tests:
            raise TemplateAssertionError(f"No test named {test.name!r}.", test.lineno)


def _unknown_name(env: _Environment, exc: TemplateAssertionError, name: str) -> TemplateError:
    known = [f for f in env.filters if not f.startswith("_")] + list(env.tests)
    unknown = re.search(r"named '([^']+)'", exc.message or "")
    near = difflib.get_close_matches(unknown.group(1), known, n=1) if unknown else []
    hint = f" (did you mean `{near[0]}`?)" if near else ""
    return TemplateError(
        f"template `{name}`, line {exc.lineno}: {(exc.message or '').rstrip('.')}{hint}. "
        "Jinja2's filters and "
        "tests: https://jinja.palletsprojects.com/en/stable/templates/#list-of-builtin-filters"
    )


def _guard_loops(ast: nodes.Template) -> nodes.Template:
    """Pass every loop's sequence through the step-counting filter."""
    for loop in ast.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
    return _GuardConcat().visit(ast)  # type: ignore[no-any-return]


class _GuardConcat(NodeTransformer):
    """`a ~ b` becomes `[a, b] | __pipeline_concat`, which counts before it joins."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        parts = nodes.List(node.nodes, lineno=node.lineno)
        return nodes.Filter(parts, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


def _blank(messages: list[dict[str, Any]]) -> bool:
    """No user message (or, without one, no message at all) says anything."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return all(not text.strip() for text in users or [m["content"] for m in messages])


def _described(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, UndefinedError | SecurityError | TypeError | ValueError):
        return text
    return f"{type(exc).__name__}: {text}"


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

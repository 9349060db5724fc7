"""The job file: TOML in, a frozen, validated `Job` out.

    job = load_job(Path("jobs/summarise.toml"))
    job.request.model            # "gpt-4o-mini"
    job.input.path               # absolute: relative paths resolve against the job file
    job = job_from_mapping({"request": {"model": "gpt-4o-mini"},
                            "template": {"user": "{{ text }}"}})   # the same, from Python

A job built in Python (`Job(...)`, or a mapping with the job file's structure) needs no
`[input]` (`pipeline.run_frame` gives it a DataFrame); its relative paths resolve against
the working folder, and it is named "job" unless it says.

Every key is checked once, here. An unknown key is an error that names the key and
the nearest valid one; a missing required key says what to write.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import SpecError
from pipeline.redact import KEY_VAR_SUFFIX

#: Concurrent requests when the job does not say: enough to saturate typical tier limits
#: at a few hundred ms per answer, few enough to be polite to a self-hosted server.
DEFAULT_CONCURRENCY = 16
#: Requests in flight at most, from the job file or --concurrency: each holds a socket and
#: a worker; beyond a few thousand a run meets file-descriptor limits, not the API's.
MAX_CONCURRENCY = 4096
#: Attempts per row before it is recorded as failed (1 try + 5 retries).
DEFAULT_MAX_ATTEMPTS = 6
#: Deadline for one attempt, connect to last byte. Long answers from slow models fit.
DEFAULT_TIMEOUT_S = 120.0
#: Reaching the server should be quick; a dead host must not hold a worker for minutes.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com/v1"
#: Azure OpenAI's current GA data-plane version.
AZURE_API_VERSION = "2024-10-21"
ANTHROPIC_VERSION = "2023-06-01"

Provider = Literal["openai", "azure", "anthropic"]
EndpointKind = Literal[
    "chat.completions",
    "responses",
    "embeddings",
    "images.generations",
    "audio.transcriptions",
    "messages",
]
#: Where each provider's key and base URL come from when the job does not say.
KEY_ENV: dict[str, str] = {
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
}
BASE_URL_ENV: dict[str, str] = {
    "openai": "OPENAI_BASE_URL",
    "azure": "AZURE_OPENAI_ENDPOINT",
    "anthropic": "ANTHROPIC_BASE_URL",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(_Strict):
    path: Path
    format: Literal["csv", "parquet", "ndjson"] | None = None
    #: A column whose values identify rows; without it the row's position is its key.
    key: str | None = None
    #: CSV's field separator: one ASCII character, e.g. ";" or "\t" (tab).
    separator: str = ","

    @field_validator("separator")
    @classmethod
    def _one_ascii_character(cls, value: str) -> str:
        if len(value) != 1 or not value.isascii() or value in '"\r\n\x00':
            raise ValueError(
                'give one ASCII character other than a quote or a line break, e.g. ";" or "\\t"'
            )
        return value


class OutputSpec(_Strict):
    #: Parquet or CSV, by extension. Default: out/<job name>.parquet under the working dir.
    path: Path | None = None
    #: Put before every result column name, for inputs that already have e.g. `status`.
    prefix: str = ""


class JsonSchemaSpec(_Strict):
    name: str = "answer"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    #: A .json file holding the schema, relative to the job file.
    file: Path | None = None
    strict: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> JsonSchemaSpec:
        if (self.schema_ is None) == (self.file is None):
            raise ValueError("give the JSON schema either inline (`schema = {...}`) or as `file`")
        return self


class ToolSpec(_Strict):
    """A function the model may call (chat completions, Responses, Anthropic)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    #: The arguments' JSON schema.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class RequestSpec(_Strict):
    #: Who serves the request: OpenAI or any OpenAI-compatible server, Azure OpenAI,
    #: or Anthropic.
    provider: Provider = "openai"
    #: Default: "messages" for Anthropic, else "chat.completions".
    endpoint: EndpointKind | None = None
    model: str
    #: Default: the provider's environment variable ($OPENAI_BASE_URL,
    #: $AZURE_OPENAI_ENDPOINT, $ANTHROPIC_BASE_URL), then the provider's public URL.
    base_url: str | None = None
    #: The environment variable that holds the API key. Default: OPENAI_API_KEY,
    #: AZURE_OPENAI_API_KEY or ANTHROPIC_API_KEY, by provider.
    api_key_env: str | None = None
    #: Azure's `api-version` query parameter, or Anthropic's `anthropic-version` header.
    api_version: str | None = None
    #: Azure: the deployment name, when it differs from the model's.
    deployment: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    #: How max_tokens is spelled on the wire. OpenAI wants `max_completion_tokens`; many
    #: OpenAI-compatible servers only know `max_tokens`. Default: chosen by base URL.
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    response_format: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None
    #: Functions the model may call; their calls come back in the `tool_calls` column.
    tools: tuple[ToolSpec, ...] = ()
    #: "auto", "none", "required", or a tool's name to force that one.
    tool_choice: str | None = None
    #: Run the calls with the functions of the same name in `tools_module` and send
    #: their results back, up to max_tool_rounds times, until the model answers.
    run_tools: bool = False
    #: Default: the job file's name with .py (jobs/x.toml -> jobs/x.py).
    tools_module: Path | None = None
    max_tool_rounds: int = Field(default=4, ge=1, le=50)
    #: Embeddings: the vector's length, for models that can shorten it.
    dimensions: int | None = Field(default=None, gt=0)
    #: Embeddings: rows sent in one request (the API takes up to 2048).
    batch_rows: int = Field(default=256, ge=1, le=2048)
    #: Images: e.g. "1024x1024"; quality e.g. "low", "standard", "hd".
    size: str | None = None
    quality: str | None = None
    #: Audio transcription: the spoken language (ISO-639-1), when known.
    language: str | None = None
    #: Sent as they are, merged into the request body (e.g. `{ logprobs = true }`).
    extra_body: dict[str, Any] = Field(default_factory=dict)
    #: Send identical requests once per run and share the answer. Turn off when
    #: sampling (temperature > 0) makes repeated identical requests meaningful.
    dedupe: bool = True
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    connect_timeout_s: float = Field(default=DEFAULT_CONNECT_TIMEOUT_S, gt=0)

    @property
    def kind(self) -> EndpointKind:
        if self.endpoint is not None:
            return self.endpoint
        return "messages" if self.provider == "anthropic" else "chat.completions"

    @property
    def key_env(self) -> str:
        return self.api_key_env or KEY_ENV[self.provider]

    @field_validator("api_key_env")
    @classmethod
    def _names_an_api_key(cls, name: str | None) -> str | None:
        # A job file must not be able to send any secret it likes as a bearer token
        # (AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN): only variables meant for API keys.
        if name is not None and not name.endswith(KEY_VAR_SUFFIX):
            raise ValueError(
                f"names ${name}, which is not meant for an API key: only variables whose "
                f"names end in {KEY_VAR_SUFFIX} can be named (e.g. MY_SERVER_{KEY_VAR_SUFFIX}"
                "); put the key in such a variable and name that one"
            )
        return name

    @model_validator(mode="after")
    def _provider_serves_endpoint(self) -> RequestSpec:
        if self.provider == "anthropic" and self.kind != "messages":
            raise ValueError(f'provider "anthropic" serves endpoint "messages", not "{self.kind}"')
        if self.kind == "messages" and self.provider != "anthropic":
            raise ValueError('endpoint "messages" is Anthropic\'s: set provider = "anthropic"')
        if self.run_tools and not self.tools:
            raise ValueError("run_tools = true needs the tools listed in `tools`")
        return self

    @model_validator(mode="after")
    def _schema_matches_format(self) -> RequestSpec:
        if self.response_format == "json_schema" and self.json_schema is None:
            raise ValueError(
                'response_format = "json_schema" needs a [request.json_schema] table '
                "with `schema` or `file`"
            )
        if self.json_schema is not None and self.response_format != "json_schema":
            raise ValueError(
                '[request.json_schema] is set: also set response_format = "json_schema"'
            )
        return self


class MessageSpec(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class TemplateSpec(_Strict):
    system: str | None = None
    #: The user message; for embeddings the text to embed, for images the prompt.
    user: str | None = None
    #: A full messages list instead of system + user.
    messages: tuple[MessageSpec, ...] | None = None
    #: Images sent with the (last) user message, e.g. ["{{ photo }}"]: each renders to
    #: an http(s) URL, a data: URL or a local file path (relative to the input file).
    #: An empty value (a null column) sends no image.
    images: tuple[str, ...] = ()
    image_detail: Literal["auto", "low", "high"] = "auto"
    #: Audio transcription: the local file to upload, e.g. "{{ path }}".
    file: str | None = None
    #: "empty": a null value renders as "". "fail": the row fails, naming the column.
    nulls: Literal["empty", "fail"] = "empty"

    @model_validator(mode="after")
    def _user_or_messages(self) -> TemplateSpec:
        if self.messages is not None and (self.system or self.user):
            raise ValueError("give either `messages` or `system`/`user`, not both")
        if self.messages is None and not self.user and self.file is None:
            raise ValueError("the template needs `user` (and optionally `system`) or `messages`")
        return self

    def parts(self) -> list[tuple[str, str]]:
        """(role, template text) pairs in the order they are sent."""
        if self.messages is not None:
            return [(m.role, m.content) for m in self.messages]
        parts = [("system", self.system)] if self.system else []
        return [*parts, ("user", self.user or "")]


class LimitsSpec(_Strict):
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=100)
    #: Share of failed rows the run tolerates before exiting 1.
    max_error_rate: float = Field(default=0.0, ge=0, le=1)
    #: First retry waits about this long; each later one doubles, up to backoff_max_s.
    backoff_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    #: Stop the run once this much has been spent (USD).
    max_cost: float | None = Field(default=None, gt=0)


class PriceSpec(_Strict):
    """USD per million tokens, for models genai-prices does not know (self-hosted: 0)."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    #: Default: the input price.
    cached_input_per_mtok: float | None = Field(default=None, ge=0)
    #: USD per request, for models priced per image (dall-e-3: 0.04 for a standard
    #: 1024x1024) or per call; added to the token prices.
    per_request_usd: float = Field(default=0.0, ge=0)
    #: USD per minute of audio, for transcription billed by duration (whisper-1: 0.006).
    per_minute_usd: float = Field(default=0.0, ge=0)


#: The name of a job built in Python that gives none (a job file's is its file's stem).
DEFAULT_JOB_NAME = "job"


class Job(_Strict):
    """A job, as a job file gives it or as Python builds it:

    Job(name="summarise", request=RequestSpec(model="gpt-4o-mini", max_tokens=64),
        template=TemplateSpec(user="Summarise: {{ body }}"), limits=LimitsSpec(rpm=500))
    """

    name: str = DEFAULT_JOB_NAME
    #: The job file's directory (for a job built in Python, the working folder when it
    #: was built): relative paths in the job resolve against it.
    root: Path = Field(default_factory=Path.cwd)
    #: The job file itself, named in messages about what it alone decides.
    file: Path | None = None
    #: The input table; a job file must name one, a job given a DataFrame needs none.
    input: InputSpec | None = None
    output: OutputSpec = OutputSpec()
    request: RequestSpec
    template: TemplateSpec
    limits: LimitsSpec = LimitsSpec()
    price: PriceSpec | None = None

    @property
    def output_path(self) -> Path:
        if self.output.path is not None:
            return self.output.path
        return Path.cwd() / "out" / f"{self.name}.parquet"

    def json_schema(self) -> dict[str, Any] | None:
        """The answer's JSON schema, read from its file if need be."""
        spec = self.request.json_schema
        if spec is None:
            return None
        if spec.schema_ is not None:
            return spec.schema_
        assert spec.file is not None
        return _read_schema_file(spec.file)

    def fingerprint(self) -> dict[str, str]:
        """What the results depend on, part by part, so a changed part can be named."""
        req = self.request
        parts: dict[str, Any] = {
            "template": self.template.model_dump(mode="json"),
            "model": req.model,
            "endpoint": f"{req.provider}:{req.kind}",
            "parameters": req.model_dump(
                mode="json",
                exclude={
                    "model",
                    "provider",
                    "endpoint",
                    "base_url",
                    "api_key_env",
                    "api_version",
                    "deployment",
                    "tools_module",
                    "json_schema",
                    "dedupe",
                    "timeout_s",
                    "connect_timeout_s",
                },
            ),
            "output schema": self.json_schema(),
        }
        return {name: digest(value) for name, value in parts.items()}


class JobFile(Job):
    """A job file's job: its [input] is required (`--input` can replace it, not supply it)."""

    input: InputSpec


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value (keys sorted)."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _read_schema_file(path: Path) -> dict[str, Any]:
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"cannot read the JSON schema file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(_not_utf8(path, exc)) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(schema, dict):
        raise SpecError(f"{path}: a JSON schema must be an object")
    return schema


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> str:
    return (
        f"{path}: byte 0x{exc.object[exc.start]:02X} at offset {exc.start} is not UTF-8; "
        "save the file as UTF-8"
    )


def load_job(path: Path) -> JobFile:
    """Read and validate a job file; raise `SpecError` with every problem found."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"job file not found: {path}") from None
    except OSError as exc:
        raise SpecError(f"cannot read job file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(_not_utf8(path, exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    root = path.resolve().parent
    raw.setdefault("name", path.stem)
    raw["root"] = root
    raw["file"] = path
    try:
        job = JobFile.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_explain(str(path), exc)) from None
    return resolve_paths(job)


#: How messages name a job given as a mapping, where a job file's would name the file.
MAPPING_NAME = "the job mapping"


def job_from_mapping(raw: Mapping[str, Any], root: Path | None = None) -> Job:
    """A job from a mapping with the job file's structure (`[input]` optional), checked as
    a job file is; relative paths resolve against `root` (default: the working folder).
    Raises `SpecError` with every problem found.

    >>> job_from_mapping({"request": {"model": "gpt-4o-mini"}, "template": {"user": "{{ t }}"}})
    """
    values = {"root": root or Path.cwd(), **raw}
    try:
        job = Job.model_validate(values)
    except ValidationError as exc:
        raise SpecError(_explain(MAPPING_NAME, exc)) from None
    return resolve_paths(job)


_AnyJob = TypeVar("_AnyJob", bound=Job)


def resolve_paths(job: _AnyJob) -> _AnyJob:
    """The job with every relative path in it made absolute against `job.root`."""

    def absolute(p: Path) -> Path:
        return p if p.is_absolute() else (job.root / p).resolve()

    updates: dict[str, Any] = {}
    if job.input is not None:
        updates["input"] = job.input.model_copy(update={"path": absolute(job.input.path)})
    if job.output.path is not None:
        place = output_place(job.output.path, job.root)
        updates["output"] = job.output.model_copy(update={"path": place})
    request: dict[str, Any] = {}
    schema = job.request.json_schema
    if schema is not None and schema.file is not None:
        request["json_schema"] = schema.model_copy(update={"file": absolute(schema.file)})
    if job.request.run_tools:
        module = job.request.tools_module or Path(f"{job.name}.py")
        request["tools_module"] = absolute(module)
    if request:
        updates["request"] = job.request.model_copy(update=request)
    return job.model_copy(update=updates)


def output_place(path: Path, root: Path) -> Path:
    """An output path made absolute against `root`, its folder resolved but not the file
    itself: a symbolic link there stays visible, to be refused, not followed."""
    full = path if path.is_absolute() else root / path
    return full.parent.resolve() / full.name


def _explain(where: str, exc: ValidationError) -> str:
    lines = [_explain_one(err) for err in exc.errors()]
    head = f"{where}: {len(lines)} problem{'s' if len(lines) > 1 else ''} in the job file"
    return "\n".join([head, *(f"  - {line}" for line in lines)])


def _explain_one(err: Any) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        where = f"[{'.'.join(loc[:-1])}]" if len(loc) > 1 else "the top level"
        return f"unknown key `{dotted}`{hint} Valid keys in {where}: {', '.join(sorted(valid))}"
    if err["type"] == "missing":
        return f"`{dotted}` is required"
    received = err.get("input")
    shown = "" if isinstance(received, dict) else f" (got {received!r})"
    prefix = f"`{dotted}`: " if dotted else ""
    return f"{prefix}{err['msg']}{shown}"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """The valid keys of the table at `loc`, for 'did you mean' hints."""
    model: type[BaseModel] = Job
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        models = [a for a in inner if issubclass(a, BaseModel)]
        if not models:
            break
        model = models[0]
    hidden = ("root", "file")  # set by load_job, not written in a job file
    return [f.alias or name for name, f in model.model_fields.items() if name not in hidden]

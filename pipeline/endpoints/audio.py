"""Audio transcription: POST {base_url}/audio/transcriptions, one audio file per row.

The row names a local file through the template's `file` (relative paths start at the
input file's folder); the optional `user` template is sent as the `prompt` that guides
spelling and style. The body is multipart/form-data as CreateTranscriptionRequest in
the OpenAI OpenAPI description has it; the transcript goes to `response`.

    [request]
    endpoint = "audio.transcriptions"
    model = "gpt-4o-transcribe"
    language = "en"

    [template]
    file = "{{ path }}"

Identical audio is sent once: a row's key is the model, the parameters and the file's
sha256 (not its path), and the body is a function of the key alone, boundary
included, so identical rows make identical bodies.
"""

from __future__ import annotations

import hashlib
import io
import wave
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.endpoints.base import Endpoint, Item
from pipeline.errors import RowProblem, SpecError
from pipeline.records import Answer, Prompt, Usage
from pipeline.spec import RequestSpec, TemplateSpec

#: OpenAI refuses uploads over 25 MB ("Maximum content size limit (26214400) exceeded").
MAX_AUDIO_BYTES = 25 * 2**20
#: The formats the API takes, by file extension, and the content type each is sent as.
CONTENT_TYPES = {
    ".flac": "audio/flac",
    ".m4a": "audio/mp4",
    ".mp3": "audio/mpeg",
    ".mp4": "audio/mp4",
    ".mpeg": "audio/mpeg",
    ".mpga": "audio/mpeg",
    ".oga": "audio/ogg",
    ".ogg": "audio/ogg",
    ".wav": "audio/wav",
    ".webm": "audio/webm",
}
#: Audio input tokens per second on the gpt-4o transcribe models: OpenAI prices their
#: audio at $6 per million tokens and estimates $0.006 a minute, so ~1,000 a minute.
AUDIO_TOKENS_PER_S = 17
#: Transcript tokens per second of audio: fast speech is about 3 words, 4 tokens.
TRANSCRIPT_TOKENS_PER_S = 4
#: A compressed file's duration is unknown without decoding it. Assume a low speech
#: bitrate (32 kbit/s), so the duration, and the TPM estimate, err high, never low.
ASSUMED_BYTES_PER_S = 4_000
#: The answer is read as JSON; these are the response formats that give JSON.
JSON_FORMATS = ("json", "verbose_json", "diarized_json")


@dataclass(frozen=True, slots=True)
class Form:
    """A multipart/form-data body and the content type that names its boundary."""

    body: bytes
    content_type: str


class AudioTranscriptions(Endpoint):
    path = "/audio/transcriptions"

    def __init__(self, spec: RequestSpec, template: TemplateSpec, base_dir: Path) -> None:
        _check_job(spec, template)
        self._spec = spec
        self._fields = _static_fields(spec)
        self.base_dir = base_dir

    def item(self, prompt: Prompt) -> Item:
        path, raw = self._read(prompt.file or "")
        text = "\n".join(str(m["content"]) for m in prompt.messages if m["role"] == "user")
        fields = [*self._fields, *([("prompt", text)] if text else [])]
        suffix = path.suffix.lower()
        key = orjson.dumps([fields, suffix, hashlib.sha256(raw).hexdigest()])
        # The uploaded name carries only the extension (what the server reads the format
        # from), so that the body is the same for the same audio under any name.
        upload = (f"audio{suffix}", CONTENT_TYPES[suffix], raw)
        body, boundary = multipart(fields, upload, seed=key)
        form = Form(body, f"multipart/form-data; boundary={boundary}")
        seconds = _duration(path, raw)
        tokens = self.count(text) + int(seconds * AUDIO_TOKENS_PER_S) + 1
        # The transcript grows with the audio, and max_output_tokens is one number for
        # the whole job: the row's TPM estimate carries the transcript's share itself.
        return Item(form, tokens + int(seconds * TRANSCRIPT_TOKENS_PER_S), key)

    def encode(self, payloads: Sequence[Any]) -> tuple[bytes, str]:
        (form,) = payloads
        return form.body, form.content_type

    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        """The transcript, and its usage as the server reports it.

        gpt-4o-transcribe models report tokens (audio tokens priced apart); whisper-1
        reports seconds of audio, priced per minute. A server that reports neither
        (whisper-1 before 2025, most self-hosted servers) gives a row that costs 0.
        """
        text = data["text"]
        if not isinstance(text, str):
            raise ValueError(f"`text` is {type(text).__name__}, not a string")
        answer = Answer(
            text=text,
            finish_reason=None,
            usage=_usage(data.get("usage") or {}),
            request_id=headers.get("x-request-id"),
            model=self._spec.model,
        )
        return [answer]

    def _read(self, reference: str) -> tuple[Path, bytes]:
        """The row's audio file and its bytes; RowProblem, naming the path, if unusable."""
        if reference.startswith(("http://", "https://", "data:")):
            raise RowProblem(f"the audio file must be a local path, not {reference[:60]!r}")
        path = Path(reference).expanduser()
        if not path.is_absolute():
            path = self.base_dir / path
        if path.suffix.lower() not in CONTENT_TYPES:
            formats = ", ".join(s[1:] for s in CONTENT_TYPES)
            raise RowProblem(f"{path}: not an audio format the API takes ({formats})")
        try:
            size = path.stat().st_size
            if size > MAX_AUDIO_BYTES:
                raise RowProblem(
                    f"the audio file {path} is {size / 2**20:.1f} MB; the API takes "
                    f"{MAX_AUDIO_BYTES // 2**20} MB at most: split or compress it"
                )
            raw = path.read_bytes()
        except OSError as exc:
            raise RowProblem(f"cannot read the audio file {path}: {exc.strerror or exc}") from None
        if not raw:
            raise RowProblem(f"the audio file {path} is empty")
        return path, raw


def multipart(
    fields: Sequence[tuple[str, str]], upload: tuple[str, str, bytes], *, seed: bytes
) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) and its boundary: text fields, then the file.

    The boundary is derived from `seed`, so equal inputs make equal bytes; it is
    checked against the content, and derived again in the (never seen) case it occurs.
    """
    filename, content_type, raw = upload
    parts = [(_disposition(name), value.encode()) for name, value in fields]
    file_head = f'{_disposition("file")}; filename="{_quote(filename)}"\r\n'
    parts.append((file_head + f"Content-Type: {content_type}", raw))
    boundary = next(b for b in _boundaries(seed) if all(b.encode() not in v for _, v in parts))
    out = bytearray()
    for head, value in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode()
        out += value
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), boundary


def _boundaries(seed: bytes) -> Iterator[str]:
    counter = 0
    while True:
        yield "pipeline-" + hashlib.sha256(seed + counter.to_bytes(4, "big")).hexdigest()[:32]
        counter += 1


def _disposition(name: str) -> str:
    return f'Content-Disposition: form-data; name="{_quote(name)}"'


def _quote(name: str) -> str:
    """A name inside a quoted header value, escaped as browsers do (WHATWG HTML)."""
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _check_job(spec: RequestSpec, template: TemplateSpec) -> None:
    """What the transcription endpoint cannot send, refused before any row is read."""
    if template.file is None:
        raise SpecError(
            'endpoint audio.transcriptions needs the audio file: [template] file = "{{ path }}" '
            "(a column holding each row's file path)"
        )
    if template.system or template.messages is not None or template.images:
        raise SpecError(
            "endpoint audio.transcriptions takes a file and an optional prompt: "
            "[template] file and user (no system, messages or images)"
        )
    if spec.response_format != "text" or spec.tools:
        raise SpecError(
            "response_format, json_schema and tools are for chat endpoints; "
            "audio.transcriptions answers with a transcript"
        )
    if spec.temperature is not None and spec.temperature > 1:
        raise SpecError(f"temperature = {spec.temperature}: transcription takes 0 to 1")
    fmt = spec.extra_body.get("response_format", "json")
    if fmt not in JSON_FORMATS:
        raise SpecError(
            f"extra_body response_format = {fmt!r}: the answer is read as JSON; use one of "
            f"{', '.join(JSON_FORMATS)}"
        )
    if spec.extra_body.get("stream"):
        raise SpecError("extra_body stream = true: audio.transcriptions reads whole answers")


def _static_fields(spec: RequestSpec) -> list[tuple[str, str]]:
    """The form fields that are the same for every row, in a fixed order."""
    values: dict[str, Any] = {"model": spec.model, "response_format": "json"}
    if spec.language is not None:
        values["language"] = spec.language
    if spec.temperature is not None:
        values["temperature"] = spec.temperature
    values.update(spec.extra_body)
    fields: list[tuple[str, str]] = []
    for name, value in values.items():
        if isinstance(value, list | tuple):
            # Arrays go as repeated `name[]` fields, as the official SDKs send them.
            fields.extend((f"{name}[]", _form_value(v)) for v in value)
        elif value is not None:
            fields.append((name, _form_value(value)))
    return fields


def _form_value(value: Any) -> str:
    """A form field's text: strings as they are, anything else as JSON (true, 0.2, {...})."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _duration(path: Path, raw: bytes) -> float:
    """Seconds of audio: exact for PCM WAV, else from the size at a low bitrate."""
    if path.suffix.lower() == ".wav":
        try:
            with wave.open(io.BytesIO(raw), "rb") as audio:
                return audio.getnframes() / audio.getframerate()
        except (wave.Error, EOFError, OSError, ZeroDivisionError):
            pass  # not PCM (float, compressed): fall back to the size
    return len(raw) / ASSUMED_BYTES_PER_S


def _usage(raw: Mapping[str, Any]) -> Usage:
    if raw.get("type") == "duration":
        return Usage(audio_seconds=float(raw.get("seconds") or 0.0))
    details = raw.get("input_token_details") or {}
    return Usage(
        prompt_tokens=int(raw.get("input_tokens") or 0),
        completion_tokens=int(raw.get("output_tokens") or 0),
        audio_tokens=int(details.get("audio_tokens") or 0),
    )

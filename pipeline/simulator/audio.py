"""POST /v1/audio/transcriptions: a multipart upload, answered as OpenAI's transcription.

    add_routes(exchange, app.router)
    # POST /v1/audio/transcriptions (multipart: file=@talk.wav, model=whisper-1)
    # -> {"text": "Quiet river ...", "usage": {"type": "duration", "seconds": 3}}

The form needs `file` (an audio file by its extension, at most 25 MB) and `model`; the
transcript is drawn from the seed and the file's bytes. Keys, `<<sim:...>>` directives
(in the prompt field), rate limits and faults apply as for chat (exchange.py), keyed on
the form's fields and the file's sha256. The gpt-4o transcribe models report tokens;
whisper-1 reports seconds of audio.
"""

from __future__ import annotations

import functools
import io
import math
import random
import wave
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final

import orjson
from aiohttp import BodyPartReader, web

from pipeline.simulator.api_errors import ApiError, error_body, invalid, missing, wrong_type
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.fake_answers import sentence_tokens
from pipeline.simulator.request_fields import model_field
from pipeline.simulator.text_tokens import count_text

_AUDIO_FORMATS: Final = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
_MAX_AUDIO_BYTES: Final = 25 * 2**20
# A compressed file's duration, without decoding it: about 128 kbit/s.
_COMPRESSED_BYTES_PER_S: Final = 16_000
# Audio tokens a minute on the gpt-4o transcribe models (OpenAI: ~$0.006/min at $6/M).
_AUDIO_TOKENS_PER_MINUTE: Final = 1_000
_TRANSCRIPT_FORMATS: Final = ("json", "verbose_json")


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/audio/transcriptions` through `exchange`."""
    answer = functools.partial(_transcript, exchange.config.seed)

    router.add_post(
        "/v1/audio/transcriptions", exchange.route(_parse_transcription, answer, load=read_form)
    )


@dataclass(frozen=True, slots=True)
class Upload:
    """A file part of a multipart form."""

    filename: str
    content_type: str | None
    data: bytes


async def read_form(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    """A multipart form's fields (`name[]` fields as lists) and the bytes that identify it.

    The identity is the fields with each file by its sha256: what `by_body` counts and
    directives key on, as the raw body is for a JSON request.
    """
    if request.content_type != "multipart/form-data":
        raise invalid(
            f"Invalid Content-Type header ({request.content_type or 'none'}), expected "
            "multipart/form-data."
        )
    form: dict[str, Any] = {}
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise ValueError("a part without a name")
            data = bytes(await part.read(decode=True))
            if part.filename is not None:
                form[part.name] = Upload(part.filename, part.headers.get("Content-Type"), data)
            elif part.name.endswith("[]"):
                form.setdefault(part.name[:-2], []).append(data.decode())
            else:
                form[part.name] = data.decode()
    except web.HTTPRequestEntityTooLarge:
        message = "The request body is too large."
        raise ApiError(413, error_body(message, "invalid_request_error")) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"Could not parse multipart form: {error}") from None
    identity = {
        name: {"filename": v.filename, "sha256": sha256(v.data).hexdigest()}
        if isinstance(v, Upload)
        else v
        for name, v in form.items()
    }
    return orjson.dumps(identity, option=orjson.OPT_SORT_KEYS), form


@dataclass(frozen=True, slots=True)
class _TranscriptionJob:
    model: str
    prompt: str
    file_digest: bytes
    seconds: float
    verbose: bool
    prompt_tokens: int
    audio_tokens: int

    @property
    def cost(self) -> int:
        return self.prompt_tokens + self.audio_tokens

    @property
    def directive_text(self) -> str:
        return self.prompt


def _parse_transcription(form: dict[str, Any]) -> _TranscriptionJob:
    upload = form.get("file")
    if upload is None:
        raise missing("file")
    if not isinstance(upload, Upload):
        raise wrong_type("file", "a file upload (with a filename)", upload)
    model = model_field(form)
    extension = upload.filename.rpartition(".")[2].lower()
    if "." not in upload.filename or extension not in _AUDIO_FORMATS:
        raise invalid(f"Invalid file format. Supported formats: {list(_AUDIO_FORMATS)}", "file")
    if len(upload.data) > _MAX_AUDIO_BYTES:
        raise ApiError(
            413,
            error_body(
                f"Maximum content size limit ({_MAX_AUDIO_BYTES}) exceeded "
                f"({len(upload.data)} bytes read)",
                "server_error",
            ),
        )
    fmt = form.get("response_format", "json")
    if fmt not in _TRANSCRIPT_FORMATS:
        raise invalid(
            f"The simulator answers response_format 'json' and 'verbose_json', not {fmt!r}.",
            "response_format",
            "unsupported_value",
        )
    if fmt == "verbose_json" and _by_tokens(model):
        raise invalid(
            f"response_format 'verbose_json' is not compatible with model '{model}'. "
            "Use 'json' or 'text' instead.",
            "response_format",
            "unsupported_value",
        )
    _temperature(form.get("temperature"))
    prompt = form.get("prompt") or ""
    seconds = _seconds(upload)
    return _TranscriptionJob(
        model=model,
        prompt=prompt,
        file_digest=sha256(upload.data).digest(),
        seconds=seconds,
        verbose=fmt == "verbose_json",
        prompt_tokens=count_text(prompt, model),
        audio_tokens=max(1, math.ceil(seconds * _AUDIO_TOKENS_PER_MINUTE / 60)),
    )


def _temperature(raw: Any) -> None:
    if raw is None:
        return
    try:
        value = float(raw)
    except ValueError:
        raise wrong_type("temperature", "a number", raw) from None
    if not 0 <= value <= 1:
        raise invalid(
            f"Invalid 'temperature': expected a number between 0 and 1, got {value}.",
            "temperature",
            "invalid_value",
        )


def _by_tokens(model: str) -> bool:
    """gpt-4o transcribe models bill (and report) tokens; whisper bills seconds."""
    return "transcribe" in model


def _seconds(upload: Upload) -> float:
    if upload.filename.lower().endswith(".wav"):
        try:
            with wave.open(io.BytesIO(upload.data), "rb") as audio:
                return audio.getnframes() / audio.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError):
            pass
    return len(upload.data) / _COMPRESSED_BYTES_PER_S


def _transcript(seed: int, job: _TranscriptionJob, digest: bytes) -> dict[str, Any]:
    rng = random.Random((seed << 256) | int.from_bytes(job.file_digest))
    words = sentence_tokens(rng)
    text = "".join(words)
    if _by_tokens(job.model):
        inputs = job.prompt_tokens + job.audio_tokens
        usage: dict[str, Any] = {
            "type": "tokens",
            "input_tokens": inputs,
            "input_token_details": {
                "text_tokens": job.prompt_tokens,
                "audio_tokens": job.audio_tokens,
            },
            "output_tokens": len(words),
            "total_tokens": inputs + len(words),
        }
    else:
        usage = {"type": "duration", "seconds": math.ceil(job.seconds)}
    if not job.verbose:
        return {"text": text, "usage": usage}
    segment = {"id": 0, "start": 0.0, "end": round(job.seconds, 3), "text": text}
    return {
        "task": "transcribe",
        "language": "english",
        "duration": round(job.seconds, 3),
        "text": text,
        "segments": [segment],
        "usage": usage,
    }

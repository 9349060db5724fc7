"""The simulator's image generation and audio transcription endpoints.

`POST /v1/images/generations` checks a body as the real API does (a prompt, a size
and quality the model offers, `n`, no `response_format` for GPT image models) and
answers small, valid PNGs (or JPEG/WebP when asked), drawn from the seed and the
prompt. `POST /v1/audio/transcriptions` reads a multipart form, needs `file` and
`model`, and answers a transcript drawn from the seed and the file's bytes.

Both go through `Simulator._post`, so keys, `<<sim:...>>` directives (in the prompt),
rate limits and faults apply as for chat. Token usage is reported for the GPT image
and gpt-4o transcribe models; whisper-1 reports seconds of audio, DALL-E nothing.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import random
import struct
import time
import wave
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from hashlib import sha256
from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import BodyPartReader, web

from pipeline.simulator import (
    _ApiError,
    _error_body,
    _invalid,
    _missing,
    _model,
    _not_one_of,
    _positive_int,
    _sentence_tokens,
    _wrong_type,
    count_text,
)

if TYPE_CHECKING:
    from pipeline.simulator import Simulator

# Sizes and qualities each model family takes; other models follow the GPT image rules.
_DALLE_SIZES: Final = {
    "dall-e-2": ("256x256", "512x512", "1024x1024"),
    "dall-e-3": ("1024x1024", "1792x1024", "1024x1792"),
}
_DALLE_QUALITIES: Final = {"dall-e-2": ("standard", "auto"), "dall-e-3": ("standard", "hd", "auto")}
_GPT_IMAGE_SIZES: Final = ("1024x1024", "1024x1536", "1536x1024", "auto")
_GPT_IMAGE_QUALITIES: Final = ("low", "medium", "high", "auto")
_PROMPT_LIMITS: Final = {"dall-e-2": 1_000, "dall-e-3": 4_000}
_GPT_IMAGE_PROMPT_LIMIT: Final = 32_000
_MAX_IMAGES: Final = 10
# Output tokens of one GPT image by quality and size, as OpenAI's image guide lists
# them; "auto" is answered as medium quality, 1024x1024.
_IMAGE_TOKENS: Final = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
# The images are small: a grid of coloured blocks, enough to be a real, readable file.
_IMAGE_SIDE: Final = 32
_IMAGE_BLOCKS: Final = 4

_AUDIO_FORMATS: Final = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
_MAX_AUDIO_BYTES: Final = 25 * 2**20
# A compressed file's duration, without decoding it: about 128 kbit/s.
_COMPRESSED_BYTES_PER_S: Final = 16_000
# Audio tokens a minute on the gpt-4o transcribe models (OpenAI: ~$0.006/min at $6/M).
_AUDIO_TOKENS_PER_MINUTE: Final = 1_000
_TRANSCRIPT_FORMATS: Final = ("json", "verbose_json")


def add_routes(sim: Simulator, router: web.UrlDispatcher) -> None:
    """Register the two endpoints on the simulator's router (before its catch-all)."""
    seed = sim.config.seed

    def handler(
        load: Callable[[web.Request], Awaitable[tuple[bytes, dict[str, Any]]]] | None,
        parse: Callable[[dict[str, Any]], Any],
        answer: Callable[[Any, bytes], dict[str, Any]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await sim._guarded(
                request, lambda started: sim._post(request, started, parse, answer, load=load)
            )

        return handle

    images = handler(None, _parse_image, functools.partial(_image_answer, seed))
    router.add_post("/v1/images/generations", images)
    transcripts = handler(read_form, _parse_transcription, functools.partial(_transcript, seed))
    router.add_post("/v1/audio/transcriptions", transcripts)


# ---------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True, slots=True)
class _ImageJob:
    model: str
    prompt: str
    n: int
    size: str
    quality: str
    output_format: str
    b64: bool
    gpt_image: bool
    prompt_tokens: int
    output_tokens: int

    @property
    def cost(self) -> int:
        return self.prompt_tokens + self.output_tokens * self.n

    @property
    def directive_text(self) -> str:
        return self.prompt


def _parse_image(payload: dict[str, Any]) -> _ImageJob:
    model = payload.get("model") or "dall-e-2"  # the API's default
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    gpt_image = model not in _DALLE_SIZES
    prompt = _image_prompt(payload, model)
    n = _positive_int(payload, "n", most=_MAX_IMAGES) or 1
    if model == "dall-e-3" and n != 1:
        raise _invalid("You must provide n=1 for this model.", "n", "invalid_value")
    size = _choice(payload, "size", _DALLE_SIZES.get(model, _GPT_IMAGE_SIZES), "1024x1024")
    qualities = _DALLE_QUALITIES.get(model, _GPT_IMAGE_QUALITIES)
    quality = _choice(payload, "quality", qualities, "auto")
    if gpt_image:
        _refuse(payload, "response_format", "style")
        fmt = _choice(payload, "output_format", ("png", "jpeg", "webp"), "png")
        size = "1024x1024" if size == "auto" else size
        quality = "medium" if quality == "auto" else quality
        tokens = _IMAGE_TOKENS[quality][size]
        b64 = True
    else:
        _refuse(payload, "output_format", "output_compression", "background", "moderation")
        fmt, tokens = "png", 0
        b64 = _choice(payload, "response_format", ("url", "b64_json"), "url") == "b64_json"
        quality = "standard" if quality == "auto" else quality
    return _ImageJob(
        model=model,
        prompt=prompt,
        n=n,
        size=size,
        quality=quality,
        output_format=fmt,
        b64=b64,
        gpt_image=gpt_image,
        prompt_tokens=count_text(prompt, model),
        output_tokens=tokens,
    )


def _image_prompt(payload: dict[str, Any], model: str) -> str:
    prompt = payload.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if not isinstance(prompt, str):
        raise _wrong_type("prompt", "a string", prompt)
    if not prompt:
        raise _invalid("Invalid 'prompt': empty string.", "prompt", "empty_string")
    limit = _PROMPT_LIMITS.get(model, _GPT_IMAGE_PROMPT_LIMIT)
    if len(prompt) > limit:
        raise _invalid(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{limit}, but got a string with length {len(prompt)} instead.",
            "prompt",
            "string_above_max_length",
        )
    return prompt


def _choice(payload: dict[str, Any], name: str, valid: tuple[str, ...], default: str) -> str:
    value = payload.get(name)
    if value is None:
        return default
    if value not in valid:
        raise _not_one_of(value, valid, name)
    return str(value)


def _refuse(payload: dict[str, Any], *names: str) -> None:
    """Parameters this model does not take: the API answers 400 for each."""
    for name in names:
        if payload.get(name) is not None:
            raise _invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")


def _image_answer(seed: int, job: _ImageJob, digest: bytes) -> dict[str, Any]:
    key = int.from_bytes(sha256(job.prompt.encode()).digest())
    data = []
    for index in range(job.n):
        rng = random.Random((((seed << 8) | index) << 256) | key)
        image: dict[str, Any] = {}
        if job.b64:
            image["b64_json"] = _b64(_picture(rng, job.output_format))
        else:
            image["url"] = f"https://simulator.invalid/images/{digest.hex()[:24]}-{index}.png"
        if job.model == "dall-e-3":
            image["revised_prompt"] = f"A detailed picture of this: {job.prompt}"
        data.append(image)
    answer: dict[str, Any] = {"created": int(time.time()), "data": data}
    if job.gpt_image:
        output = job.output_tokens * job.n
        answer |= {
            "background": "opaque",
            "output_format": job.output_format,
            "size": job.size,
            "quality": job.quality,
            "usage": {
                "input_tokens": job.prompt_tokens,
                "input_tokens_details": {"text_tokens": job.prompt_tokens, "image_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
                "total_tokens": job.prompt_tokens + output,
            },
        }
    return answer


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _picture(rng: random.Random, fmt: str) -> bytes:
    """A small image of coloured blocks; PNG by hand, JPEG or WebP through Pillow."""
    side, blocks = _IMAGE_SIDE, _IMAGE_BLOCKS
    colours = [rng.randbytes(3) for _ in range(blocks * blocks)]
    step = side // blocks
    rows = [
        b"".join(colours[(y // step) * blocks + x // step] for x in range(side))
        for y in range(side)
    ]
    png = _png(side, side, rows)
    if fmt == "png":
        return png
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        image.save(out, format=fmt.upper())
    return out.getvalue()


def _png(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT of filter-0 rows, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------
# Audio


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
        raise _invalid(
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
        raise _ApiError(413, _error_body(message, "invalid_request_error")) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise _invalid(f"Could not parse multipart form: {error}") from None
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
        raise _missing("file")
    if not isinstance(upload, Upload):
        raise _wrong_type("file", "a file upload (with a filename)", upload)
    model = _model(form)
    extension = upload.filename.rpartition(".")[2].lower()
    if "." not in upload.filename or extension not in _AUDIO_FORMATS:
        raise _invalid(f"Invalid file format. Supported formats: {list(_AUDIO_FORMATS)}", "file")
    if len(upload.data) > _MAX_AUDIO_BYTES:
        raise _ApiError(
            413,
            _error_body(
                f"Maximum content size limit ({_MAX_AUDIO_BYTES}) exceeded "
                f"({len(upload.data)} bytes read)",
                "server_error",
            ),
        )
    fmt = form.get("response_format", "json")
    if fmt not in _TRANSCRIPT_FORMATS:
        raise _invalid(
            f"The simulator answers response_format 'json' and 'verbose_json', not {fmt!r}.",
            "response_format",
            "unsupported_value",
        )
    if fmt == "verbose_json" and _by_tokens(model):
        raise _invalid(
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
        raise _wrong_type("temperature", "a number", raw) from None
    if not 0 <= value <= 1:
        raise _invalid(
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
    words = _sentence_tokens(rng)
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

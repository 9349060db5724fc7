"""POST /v1/images/generations: checked and answered as OpenAI's image generation.

    add_routes(exchange, app.router)
    # POST /v1/images/generations {"model": "gpt-image-1", "prompt": "a lighthouse"}
    # -> {"created": ..., "data": [{"b64_json": "iVBORw0KGgo..."}], "usage": {...}}

The body is checked as the real API does (a prompt, a size and quality the model
offers, `n`, no `response_format` for GPT image models) and answered with small, valid
PNGs (or JPEG/WebP when asked), drawn from the seed and the prompt. Keys, `<<sim:...>>`
directives (in the prompt), rate limits and faults apply as for chat (exchange.py).
Token usage is reported for the GPT image models; DALL-E reports none.
"""

from __future__ import annotations

import base64
import functools
import io
import random
import struct
import time
import zlib
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final

from aiohttp import web
from PIL import Image

from pipeline.simulator.api_errors import invalid, missing, not_one_of, wrong_type
from pipeline.simulator.exchange import Exchange
from pipeline.simulator.request_fields import positive_int
from pipeline.simulator.text_tokens import count_text

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


def add_routes(exchange: Exchange, router: web.UrlDispatcher) -> None:
    """Serve `POST /v1/images/generations` through `exchange`."""
    answer = functools.partial(_image_answer, exchange.config.seed)

    router.add_post("/v1/images/generations", exchange.route(_parse_image, answer))


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
        raise wrong_type("model", "a string", model)
    gpt_image = model not in _DALLE_SIZES
    prompt = _image_prompt(payload, model)
    n = positive_int(payload, "n", most=_MAX_IMAGES) or 1
    if model == "dall-e-3" and n != 1:
        raise invalid("You must provide n=1 for this model.", "n", "invalid_value")
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
        raise missing("prompt")
    if not isinstance(prompt, str):
        raise wrong_type("prompt", "a string", prompt)
    if not prompt:
        raise invalid("Invalid 'prompt': empty string.", "prompt", "empty_string")
    limit = _PROMPT_LIMITS.get(model, _GPT_IMAGE_PROMPT_LIMIT)
    if len(prompt) > limit:
        raise invalid(
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
        raise not_one_of(value, valid, name)
    return str(value)


def _refuse(payload: dict[str, Any], *names: str) -> None:
    """Parameters this model does not take: the API answers 400 for each."""
    for name in names:
        if payload.get(name) is not None:
            raise invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")


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

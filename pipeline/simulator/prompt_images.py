"""What an image in a chat message costs, counted the way OpenAI counts it.

    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
    image_part_tokens(part, "gpt-4o")     # 765 for a 1024x1024 image ("auto" is "high")

The size comes from the image's own header (PNG, JPEG, GIF, WebP), decoded from the
first bytes of the base64 text: an image is never counted by the length of that text.
A remote image is not fetched; it counts as `REMOTE_SIZE`. This is written apart from
the client's estimate (pipeline/prompt_images.py), so that each checks the other.

OpenAI's rules (the vision guide's "Calculating costs"): tile models scale the image to
fit 2048 x 2048, then its short side down to 768, and charge a base plus a price per
512 px tile ("low" detail: the base alone); patch models charge a multiple of the
32 px patches that cover the image, at most 1536 patches.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping
from typing import Any, Final

from PIL import Image, UnidentifiedImageError

#: The size a remote (http) image is taken to have: the simulator does not fetch it.
REMOTE_SIZE: Final = (1024, 768)
#: Base64 characters decoded first: enough for any PNG, GIF or WebP header and for a
#: JPEG's size marker unless large metadata comes before it (then all is decoded).
_HEADER_CHARS: Final = 64 * 1024
#: What the API takes per image.
MAX_IMAGE_BYTES: Final = 20 * 2**20
_FORMATS: Final = frozenset({"PNG", "JPEG", "GIF", "WEBP"})
_DETAILS: Final = ("auto", "low", "high")

# Models charged by 512 px tiles: (name prefix, base tokens, tokens per tile). Longer
# prefixes first: "gpt-4o-mini" costs 33 times "gpt-4o" in tokens (not in dollars).
_TILE_MODELS: Final = (
    ("gpt-4o-mini", 2833, 5667),
    ("gpt-4o", 85, 170),
    ("gpt-4.1", 85, 170),
    ("gpt-4.5", 85, 170),
    ("gpt-5", 70, 140),
    ("o1", 75, 150),
    ("o3", 75, 150),
    ("computer-use", 65, 129),
)
_DEFAULT_TILES: Final = (85, 170)
# Models charged by 32 px patches, with the multiplier applied to the patch count.
_PATCH_MODELS: Final = (
    ("gpt-4.1-mini", 1.62),
    ("gpt-4.1-nano", 2.46),
    ("gpt-5-mini", 1.62),
    ("gpt-5-nano", 2.46),
    ("o4-mini", 1.72),
)
_MAX_PATCHES: Final = 1536


class ImageProblem(ValueError):
    """The image part is not one the API would take; the message says why."""

    def __init__(self, message: str, code: str = "invalid_image_format") -> None:
        super().__init__(message)
        self.code = code


def image_part_tokens(part: Mapping[str, Any], model: str) -> int:
    """Prompt tokens of one `image_url` content part; raise ImageProblem if unusable."""
    image = part.get("image_url")
    if not isinstance(image, Mapping) or not isinstance(image.get("url"), str):
        raise ImageProblem(
            "Missing required parameter: 'image_url.url'.", "missing_required_parameter"
        )
    detail = image.get("detail", "auto")
    if detail not in _DETAILS:
        raise ImageProblem(
            f"Invalid value: '{detail}'. Supported values are: 'auto', 'low', and 'high'.",
            "invalid_value",
        )
    url: str = image["url"]
    if url.startswith(("http://", "https://")):
        size = REMOTE_SIZE
    elif url.startswith("data:"):
        size = data_url_size(url)
    else:
        raise ImageProblem(
            "Invalid 'image_url.url': expected an http(s) URL or a base64 data URL.",
            "invalid_image_url",
        )
    return tokens_for(size, detail, model)


def data_url_size(url: str) -> tuple[int, int]:
    """(width, height) from a base64 data URL's image header."""
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise ImageProblem("Invalid image data URL: expected 'data:image/...;base64,...'.")
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ImageProblem(
            f"Image too large: the maximum is {MAX_IMAGE_BYTES // 2**20} MB per image.",
            "image_too_large",
        )
    size = _size(data[: _HEADER_CHARS - _HEADER_CHARS % 4])
    if size is None and len(data) > _HEADER_CHARS:
        size = _size(data)
    if size is None:
        raise ImageProblem(
            "You uploaded an unsupported image. Please make sure your image is valid and "
            "one of the following formats: ['png', 'jpeg', 'gif', 'webp']."
        )
    return size


def _size(data: str) -> tuple[int, int] | None:
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return image.size if image.format in _FORMATS else None
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        return None


def tokens_for(size: tuple[int, int], detail: str, model: str) -> int:
    """Tokens of an image of `size` pixels at `detail` on `model`, by OpenAI's rules.

    >>> tokens_for((1024, 1024), "high", "gpt-4o"), tokens_for((2048, 4096), "high", "gpt-4o")
    (765, 1105)
    """
    name = model.lower()
    for prefix, multiplier in _PATCH_MODELS:
        if name.startswith(prefix):
            return math.ceil(patches(*size) * multiplier)
    base, per_tile = next(
        ((b, t) for prefix, b, t in _TILE_MODELS if name.startswith(prefix)), _DEFAULT_TILES
    )
    if detail == "low":
        return base
    return base + per_tile * tiles(*size)


def tiles(width: int, height: int) -> int:
    """512 px tiles of the image once fit in 2048 x 2048 and its short side cut to 768."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return math.ceil(w / 512) * math.ceil(h / 512)


def patches(width: int, height: int) -> int:
    """32 px patches covering the image, after shrinking it to fit 1536 of them.

    The guide's example: 1800 x 2400 is 57 x 75 = 4275 patches, too many; shrunk by
    sqrt(1536 * 32^2 / (1800 * 2400)) and then so that the width is whole patches, it
    is 1056 x 1408: 33 x 44 = 1452.
    """
    count = math.ceil(width / 32) * math.ceil(height / 32)
    if count <= _MAX_PATCHES:
        return count
    shrink = math.sqrt(_MAX_PATCHES * 32 * 32 / (width * height))
    across = math.floor(width * shrink / 32)
    # The width is now `across` whole patches; the height keeps the aspect ratio.
    down = math.ceil(across * height / width - 1e-9)
    return min(_MAX_PATCHES, across * down)

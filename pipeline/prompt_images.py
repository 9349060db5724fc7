"""Images in prompts: a reference (URL or local file) -> a content part and its tokens.

    ref = load_image("photos/cat.jpg", base_dir=Path("data"))   # reads the header only
    ref.url                     # "data:image/jpeg;base64,..." (a URL stays a URL)
    image_tokens(ref.size, "high", "gpt-4o")                    # 765 for 1024x1024

Servers count an image by its pixel size and detail level, never by the length of its
base64 text, so that is how it is estimated here. Pillow reads the size from the file's
header without decoding the pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import RowProblem

#: Servers take images up to this size (OpenAI: 50 MB per request, 20 MB per image).
MAX_IMAGE_BYTES = 20 * 2**20
#: The size assumed for a remote image, whose size is unknown without fetching it:
#: OpenAI's worst case at high detail (2048x768 after scaling: 8 tiles).
UNKNOWN_SIZE = (2048, 768)


@dataclass(frozen=True, slots=True)
class ImageRef:
    #: What goes on the wire: an http(s) URL or a data: URL.
    url: str
    media_type: str | None
    #: (width, height) in pixels; None for a remote image.
    size: tuple[int, int] | None
    #: The base64 text of a local file (for APIs that take it apart from the type).
    data: str | None = None


def load_image(reference: str, base_dir: Path) -> ImageRef:
    """A URL as it is; a local path read and sent inline. Raise RowProblem if unusable."""
    reference = reference.strip()
    if reference.startswith(("http://", "https://")):
        return ImageRef(reference, mimetypes.guess_type(reference)[0], None)
    if reference.startswith("data:"):
        head, _, data = reference.partition(",")
        media_type = head[5:].split(";")[0] or None
        return ImageRef(reference, media_type, _size_of_base64(data), data)
    path = Path(reference).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    try:
        raw = path.read_bytes() if path.stat().st_size <= MAX_IMAGE_BYTES else None
    except OSError as exc:
        raise RowProblem(f"cannot read the image {path}: {exc.strerror or exc}") from None
    if raw is None:
        raise RowProblem(f"the image {path} is over {MAX_IMAGE_BYTES // 2**20} MB")
    size, media_type = _inspect(raw, path)
    data = base64.b64encode(raw).decode()
    return ImageRef(f"data:{media_type};base64,{data}", media_type, size, data)


def load_images(
    references: Sequence[str], base_dir: Path, detail: str, model: str
) -> tuple[list[ImageRef], int]:
    """Each referenced image, and the prompt tokens they cost on an OpenAI model."""
    images = [load_image(reference, base_dir) for reference in references]
    return images, sum(image_tokens(image.size, detail, model) for image in images)


def _inspect(raw: bytes, path: Path) -> tuple[tuple[int, int], str]:
    from PIL import Image, UnidentifiedImageError  # only for images: start-up time

    try:
        with Image.open(io.BytesIO(raw)) as image:
            size, kind = image.size, image.format
    except (UnidentifiedImageError, OSError) as exc:
        raise RowProblem(f"{path} is not an image Pillow can read: {exc}") from None
    media_type = Image.MIME.get(kind or "", None)
    if media_type not in ("image/png", "image/jpeg", "image/gif", "image/webp"):
        raise RowProblem(f"{path} is {kind}; send PNG, JPEG, GIF or WebP")
    return size, media_type


def _size_of_base64(data: str) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError  # only for images: start-up time

    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as image:
            return image.size
    except (UnidentifiedImageError, OSError, binascii.Error, ValueError):
        return None


# (base tokens, tokens per 512 px tile) for models priced by tiles; OpenAI's vision guide.
_TILES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("gpt-4o-mini", (2833, 5667)),
    ("gpt-5", (70, 140)),
    ("o1", (75, 150)),
    ("o3", (75, 150)),
    ("gpt-4.5", (85, 170)),
    ("gpt-4.1", (85, 170)),
    ("gpt-4o", (85, 170)),
    ("computer-use", (65, 129)),
)
# Models priced by 32 px patches (capped at 1536), with their multiplier.
_PATCHES: tuple[tuple[str, float], ...] = (
    ("gpt-4.1-mini", 1.62),
    ("gpt-4.1-nano", 2.46),
    ("o4-mini", 1.72),
    ("gpt-5-mini", 1.62),
    ("gpt-5-nano", 2.46),
)


def image_tokens(size: tuple[int, int] | None, detail: str, model: str) -> int:
    """Prompt tokens an image costs on an OpenAI model (Anthropic: `anthropic_image_tokens`)."""
    name = model.lower()
    width, height = size or UNKNOWN_SIZE
    patched = next((m for p, m in _PATCHES if name.startswith(p)), None)
    if patched is not None:
        return math.ceil(_patches(width, height) * patched)
    base, per_tile = next((t for p, t in _TILES if name.startswith(p)), (85, 170))
    if detail == "low":
        return base
    # Fit in 2048 x 2048, then shorten the short side to 768; count 512 px tiles.
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def _patches(width: int, height: int) -> int:
    """32 px patches covering the image, shrunk to fit 1536 of them as the guide does:
    by sqrt(1536 * 32^2 / area), then a little more so the width is whole patches
    (1800 x 2400 -> 1056 x 1408: 33 x 44 = 1452)."""
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches <= 1536:
        return patches
    shrink = math.sqrt(1536 * 32 * 32 / (width * height))
    width_p = math.floor(width * shrink / 32) or 1
    # The height follows the width's aspect ratio; the epsilon absorbs float error.
    return min(1536, width_p * math.ceil(width_p * height / width - 1e-9))


def anthropic_image_tokens(size: tuple[int, int] | None) -> int:
    """Anthropic: about width x height / 750, after the long side is cut to 1568 px."""
    width, height = size or (1568, 1568)
    scale = min(1.0, 1568 / max(width, height))
    return math.ceil(width * scale * height * scale / 750)

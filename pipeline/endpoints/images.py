"""Image generation: POST {base_url}/images/generations, one image per row.

The rendered `user` template is the prompt. The image comes back base64-encoded and
becomes a file beside the output (`<output stem>.files/<row>.png`); the output's
`image_path` column names it. Request and response shapes follow CreateImageRequest
and ImagesResponse in the OpenAI OpenAPI description.

    [request]
    endpoint = "images.generations"
    model = "gpt-image-1"
    size = "1024x1024"
    quality = "low"
    extra_body = { output_format = "webp" }    # the file is then <row>.webp

The GPT image models always answer with base64 and refuse `response_format`; dall-e-2
and dall-e-3 answer with a URL unless asked for `b64_json`, so they are asked.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline.endpoints.base import Endpoint, Item
from pipeline.errors import RowProblem, SpecError
from pipeline.records import Answer, Prompt, Usage
from pipeline.spec import RequestSpec, TemplateSpec

#: Prompt length limits in characters, by model family (CreateImageRequest.prompt).
MAX_PROMPT_CHARS = {"dall-e-2": 1_000, "dall-e-3": 4_000}
MAX_PROMPT_CHARS_GPT_IMAGE = 32_000
#: The file suffix of each `output_format`; PNG when neither the job nor the answer says.
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
#: Output tokens of one gpt-image-1 image by quality and size (OpenAI's image generation
#: guide). The TPM limiter reserves them; an unknown size or "auto" reserves the most.
IMAGE_OUTPUT_TOKENS = {
    ("low", "1024x1024"): 272,
    ("low", "1024x1536"): 408,
    ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056,
    ("medium", "1024x1536"): 1584,
    ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160,
    ("high", "1024x1536"): 6240,
    ("high", "1536x1024"): 6208,
}


class ImageGenerations(Endpoint):
    path = "/images/generations"
    answer_column = "image_path"
    #: Up to 10 base64 images of a few MB each.
    max_response_bytes = 128 * 2**20

    def __init__(self, spec: RequestSpec, template: TemplateSpec) -> None:
        _check_job(spec, template)
        self._spec = spec
        self._dalle = spec.model.startswith("dall-e")
        self._static = _static_fields(spec, dalle=self._dalle)
        self._limit = MAX_PROMPT_CHARS.get(spec.model, MAX_PROMPT_CHARS_GPT_IMAGE)

    def item(self, prompt: Prompt) -> Item:
        text = "\n".join(str(m["content"]) for m in prompt.messages if m["role"] == "user")
        if not text.strip():
            raise RowProblem("the image prompt is empty (the `user` template rendered nothing)")
        if len(text) > self._limit:
            raise RowProblem(
                f"the image prompt is {len(text):,} characters; {self._spec.model} takes "
                f"{self._limit:,} at most"
            )
        body = orjson.dumps({"model": self._spec.model, "prompt": text, **self._static})
        return Item(body, self.count(text), body)

    def max_output_tokens(self) -> int:
        if self._dalle:
            return 0  # priced and limited per image, not per token
        quality, size = self._spec.quality or "auto", self._spec.size or "auto"
        return IMAGE_OUTPUT_TOKENS.get((quality, size), max(IMAGE_OUTPUT_TOKENS.values()))

    def answers(
        self, data: Any, headers: Mapping[str, str], weights: Sequence[int]
    ) -> list[Answer]:
        """The first image of the answer, as a file to write.

        A server that ignores `b64_json` and answers with a URL only (some
        OpenAI-compatible image servers do) still gives an `ok` row: the URL is kept
        as the answer text, and no file is written. OpenAI's URLs expire after an hour.
        """
        images = data.get("data")
        if not images:
            raise ValueError("the answer has no image in `data`")
        image = images[0]
        extra: dict[str, Any] = {}
        if image.get("revised_prompt"):
            extra["revised_prompt"] = image["revised_prompt"]
        usage = _usage(data.get("usage") or {})
        request_id = headers.get("x-request-id")
        model = data.get("model") or self._spec.model
        encoded = image.get("b64_json")
        if not encoded:
            url = image.get("url")
            if not url:
                raise ValueError("the image has neither `b64_json` nor `url`")
            extra["image_url"] = url
            return [Answer(str(url), None, usage, request_id, model, extra)]
        fmt = data.get("output_format") or self._static.get("output_format") or "png"
        extra["file_suffix"] = SUFFIXES.get(str(fmt), f".{fmt}")
        raw = base64.b64decode(encoded, validate=True)  # binascii.Error is a ValueError
        return [Answer(None, None, usage, request_id, model, extra, data=raw)]


def _check_job(spec: RequestSpec, template: TemplateSpec) -> None:
    """What the images endpoint cannot send, refused before any row is read."""
    if template.system or template.messages is not None or template.images:
        raise SpecError(
            "endpoint images.generations sends one prompt: write it as [template] user "
            "(no system, messages or images)"
        )
    if spec.response_format != "text" or spec.tools:
        raise SpecError(
            "response_format, json_schema and tools are for chat endpoints; "
            "images.generations answers with an image"
        )
    n = spec.extra_body.get("n", 1)
    if n != 1:
        raise SpecError(f"extra_body n = {n!r}: images.generations makes one image per row")
    if spec.extra_body.get("stream"):
        raise SpecError("extra_body stream = true: images.generations reads whole answers")


def _static_fields(spec: RequestSpec, *, dalle: bool) -> dict[str, Any]:
    """The body fields that are the same for every row, built once."""
    fields: dict[str, Any] = {"n": 1}
    if spec.size is not None:
        fields["size"] = spec.size
    if spec.quality is not None:
        fields["quality"] = spec.quality
    if dalle:
        fields["response_format"] = "b64_json"  # else a URL that expires in an hour
    return {**fields, **spec.extra_body}


def _usage(raw: Mapping[str, Any]) -> Usage:
    """GPT image models report tokens (text and image input, image output); DALL-E none."""
    return Usage(
        prompt_tokens=int(raw.get("input_tokens") or 0),
        completion_tokens=int(raw.get("output_tokens") or 0),
    )

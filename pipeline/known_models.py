"""What genai-prices says of a model, remembered by its version across runs.

    price = remembered(f"price {model}", lambda: look_up_price(model))   # JSON values
    window = remembered(f"context_window {model}", lambda: 128_000)

Importing genai-prices and looking a model up costs about 0.15 s of start-up, a third
of what comes before the first request; its answers change only with its version
(its data ships inside the wheel). So they are kept in
`$XDG_CACHE_HOME/pipeline/models.json` (`~/.cache/...`), one table per genai-prices
version, and a later run reads that file instead. A cache that cannot be read is looked
up again; one that cannot be written is no reason to fail a run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

#: The distribution whose answers are remembered.
DISTRIBUTION = "genai-prices"


@functools.cache
def version() -> str:
    """genai-prices' version, read from its metadata without importing it."""
    return importlib.metadata.version(DISTRIBUTION)


def remembered(key: str, find: Callable[[], Any]) -> Any:
    """`find()`'s answer for `key` (a JSON value) as this genai-prices version gave it
    before, or found now and kept."""
    current = version()
    table = _read().get(current, {})
    if key in table:
        return table[key]
    value = find()
    _write({current: {**table, key: value}})  # other versions' tables go
    return value


def cache_file() -> Path | None:
    """Where the cache is; None when there is no home to keep it in."""
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no HOME and no passwd entry: run without the cache
        return None
    return Path(base) / "pipeline" / "models.json"


@functools.cache
def _read() -> dict[str, Any]:
    """The cache's tables, read once a process (`_write` refreshes them)."""
    path = cache_file()
    try:
        data = orjson.loads(path.read_bytes()) if path is not None else {}
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(data: dict[str, Any]) -> None:
    _read.cache_clear()
    path = cache_file()
    if path is None:
        return
    with contextlib.suppress(OSError, TypeError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".models-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(orjson.dumps(data))
            os.replace(tmp, path)  # atomic: a concurrent run reads the old or the new file
        finally:
            Path(tmp).unlink(missing_ok=True)

"""Keys never leave the process: one redaction for every text a run records or shows.

    redact("Incorrect API key provided: SK-CANARY-ABC1...", "sk-canary-abc123xyz")
    # 'Incorrect API key provided: [redacted]...'

Servers and proxies echo a key back in error bodies, and not always whole: a prefix
("sk-proj-abc1...wxyz"), a different case, a slice. A prefix of the key of at least
`MIN_ECHO_CHARS` characters, or any run of at least twice that less one, matched
without regard to case, is replaced together with whatever continues it, so the
journal's `error`, the output, the summary JSON and stderr never carry a usable part.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.records import RowResult

REDACTED = "[redacted]"
#: The shortest prefix of a key that is redacted. Servers echo 8 or more characters
#: ("sk-proj-" and up); shorter runs would also hit ordinary words in long answers.
#: A key shorter than this is not redacted at all: it is not a real key. The key is
#: looked for by its slices at every MIN_ECHO_CHARS-th character, so a run from its
#: middle is caught from 2 * MIN_ECHO_CHARS - 1 characters: a search for every slice
#: took 0.6 ms per 3 KB answer for a 164-character key, these take 0.04 ms.
MIN_ECHO_CHARS = 8
#: Environment variables whose values are keys: what `api_key_env` may name.
KEY_VAR_SUFFIX = "API_KEY"


def redact(text: str, secret: str | None) -> str:
    """`text` with every echo of `secret` (whole, in part, in any case) replaced."""
    if not secret or len(secret) < MIN_ECHO_CHARS or not text:
        return text
    slices, pattern, folded = _pieces(secret)
    lowered = text.lower()
    if not any(s in lowered for s in slices):  # the common case: nothing to do
        return text
    out: list[str] = []
    done = 0
    for match in pattern.finditer(text):
        start, end = match.span()
        if start < done:  # already inside a redacted run
            continue
        at = folded.find(match.group().lower())
        # Grow the run both ways while the text goes on matching the key.
        while end < len(text) and at + end - start < len(folded):
            if text[end].lower() != folded[at + end - start]:
                break
            end += 1
        while start > done and at > 0 and text[start - 1].lower() == folded[at - 1]:
            start, at = start - 1, at - 1
        out.extend((text[done:start], REDACTED))
        done = end
    out.append(text[done:])
    return "".join(out)


def redact_all(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = redact(text, secret)
    return text


def env_keys(env: Mapping[str, str]) -> list[str]:
    """The values of the variables meant for API keys: redacted from any message shown."""
    return [v for k, v in env.items() if k.upper().endswith(KEY_VAR_SUFFIX) and v]


def redact_result(result: RowResult, secret: str | None) -> RowResult:
    """The result with any echo of the key taken out of the texts a server sent."""
    if not secret:
        return result
    changed: dict[str, Any] = {}
    for name in _SERVER_TEXTS:
        value = getattr(result, name)
        if isinstance(value, str) and (clean := redact(value, secret)) != value:
            changed[name] = clean
    return dataclasses.replace(result, **changed) if changed else result


#: RowResult's fields whose text comes from the server, where an echoed key can hide.
_SERVER_TEXTS = ("error", "response", "tool_calls", "finish_reason", "request_id", "model")


@functools.lru_cache(maxsize=8)
def _pieces(secret: str) -> tuple[tuple[str, ...], re.Pattern[str], str]:
    """The key's slices to look for (lower-cased), a pattern matching any of them in
    any case, and the key lower-cased."""
    folded = secret.lower()
    if len(folded) != len(secret):  # a character that lowers to two: compare as written
        folded = secret
    starts = [*range(0, len(folded) - MIN_ECHO_CHARS + 1, MIN_ECHO_CHARS)]
    starts.append(len(folded) - MIN_ECHO_CHARS)  # the end, whatever the length
    slices = tuple(sorted({folded[i : i + MIN_ECHO_CHARS] for i in starts}))
    alternatives = "|".join(re.escape(s) for s in slices)
    return slices, re.compile(alternatives, re.IGNORECASE), folded

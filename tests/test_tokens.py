"""Offline token counts: OpenAI's encodings for its models, bytes/4 for the rest."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.tokens import (
    HEURISTIC,
    bytes_over_four,
    encoding_for,
    estimate_tokens,
    text_counter,
)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4o-transcribe", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-3-5-haiku-latest", None),
        ("llama3.1:8b", None),
        ("whisper-1", None),
    ],
)
def test_each_openai_model_has_its_encoding(model: str, encoding: str | None) -> None:
    assert encoding_for(model) == encoding
    assert text_counter(model).encoding == (encoding or HEURISTIC)


def test_the_counts_are_openais() -> None:
    # OpenAI's cookbook ("How to count tokens with tiktoken"): "tiktoken is great!" is
    # ["t", "ik", "token", " is", " great", "!"] in cl100k_base.
    assert text_counter("gpt-4")("tiktoken is great!") == 6
    # The same words repeated cost one token each in both encodings...
    assert text_counter("gpt-4o")("policy" + " policy" * 99) == 100
    # ...and o200k_base, built for more languages, needs fewer tokens for Japanese.
    japanese = "お誕生日おめでとうございます。今日はとても良い天気ですね。" * 10
    assert text_counter("gpt-4o")(japanese) < text_counter("gpt-4")(japanese)
    # Text that looks like a special token is counted as the text it is.
    assert text_counter("gpt-4o")("<|endoftext|>") > 1


def test_english_is_about_a_quarter_below_four_bytes_a_token() -> None:
    prose = (
        "The committee met on Tuesday to review the quarterly figures, and agreed that "
        "the new warehouse should open before the end of the year. "
    ) * 20
    exact = text_counter("gpt-4o-mini")(prose)
    assert 0.65 < exact / bytes_over_four(prose) < 0.9


def test_a_chat_prompt_adds_each_messages_framing_and_the_replys_priming() -> None:
    count = text_counter("gpt-4")
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "tiktoken is great!"},
        {"role": "user", "content": [{"type": "text", "text": "tiktoken is great!"}]},
    ]
    assert estimate_tokens(messages, count) == 3 + (6 + 4) + (6 + 4)


def test_loading_the_tokenizer_is_quick_quiet_and_needs_no_network() -> None:
    # The package's own __init__ parses both encodings in Python (0.4 s, and a
    # DeprecationWarning); the compiled module alone loads one in tens of ms.
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from pipeline.tokens import text_counter\n"
        "assert text_counter('gpt-4o-mini')('hello world') == 2\n"
        "print(time.perf_counter() - t, 'bpe_openai' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""},
    )
    seconds, imported_package = done.stdout.split()
    assert imported_package == "False"
    assert float(seconds) < 0.5

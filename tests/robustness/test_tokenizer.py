"""Issue 7: any text a scraper can produce tokenizes to a valid, well-formed row."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.tokenizer import VOCAB_SIZE, Tokenizer

TOK = Tokenizer()
SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def assert_valid_row(row: torch.Tensor, context_length: int) -> None:
    assert row.dtype == torch.long and row.shape == (context_length,)
    assert int(row.min()) >= 0 and int(row.max()) < VOCAB_SIZE
    assert int(row[0]) == TOK.sot_token_id
    eot_positions = (row == TOK.eot_token_id).nonzero().flatten().tolist()
    assert eot_positions, "no EOT in row"
    # everything after the last EOT is padding
    assert row[eot_positions[-1] + 1 :].eq(0).all()


@SETTINGS
@given(st.text(max_size=400))
def test_any_unicode_text_gives_valid_row(text: str) -> None:
    assert_valid_row(TOK(text)[0], 77)


@SETTINGS
@given(st.binary(max_size=400))
def test_non_utf8_bytes_decoded_with_replacement(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    assert_valid_row(TOK(text)[0], 77)
    assert_valid_row(TOK(data.decode("latin-1"))[0], 77)


@SETTINGS
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=50), max_size=8), st.integers(2, 100))
def test_batches_and_context_lengths(texts: list[str], context_length: int) -> None:
    out = TOK(texts, context_length=context_length)
    assert out.shape == (len(texts), context_length)
    for row in out:
        assert_valid_row(row, context_length)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\x00",
        "a\x00b\x00c",
        "\ufffd" * 500,
        "\U0010ffff\U000e0001",
        " " * 10_000,
        "word " * 20_000,  # far longer than the context: truncated, EOT last
        "&amp;" * 2000,
        "\u0301" * 300,  # combining marks with no base
        "z" * 12_000,  # one degenerate 'word': chunked, bounded time
        "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000)),
        "a photo of " + "&amp;" * 100_000,  # 500 kB of entities
    ],
)
def test_hostile_texts(text: str) -> None:
    row = TOK(text)[0]
    assert_valid_row(row, 77)
    if len(TOK.encode(text[:2000])) > 75:
        assert int(row[-1]) == TOK.eot_token_id

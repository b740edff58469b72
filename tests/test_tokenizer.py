"""Tokenizer parity with open_clip (test-only oracle) and the batched-call contract."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from helpers import joined_pieces
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.errors import ConfigError
from clipforge.tokenizer import (
    _MAX_TOKEN_CHARS,
    DEFAULT_CONTEXT_LENGTH,
    MAX_WORD_CHARS,
    VOCAB_SIZE,
    Tokenizer,
    clean_text,
    decode,
    tokenize,
)

open_clip = pytest.importorskip("open_clip")

WORDS = (
    "a photo of the dog cat bicycle red blue green running under over tree house car street beach "
    "sunset people man woman child playing ball with on in at sky mountain river boat train city "
    "night snow rain coffee cup table chair window door book phone laptop pizza sandwich"
).split()
ACCENTED = [
    "café",
    "naïve",
    "Ångström",
    "straße",
    "résumé",
    "jalapeño",
    "Zürich",
    "e\u0301",
    "İstanbul",
    "ΣΊΣΥΦΟΣ",
]
SCRIPTS = [
    "Привет мир",
    "γειά σου",
    "שלום",
    "مرحبا بالعالم",
    "नमस्ते",
    "สวัสดี",
    "안녕하세요",
    "こんにちは",
    "你好世界",
]
ENTITIES = [
    "&amp;",
    "&#39;",
    "&quot;",
    "&lt;b&gt;",
    "&amp;amp;",
    "&nbsp;",
    "&#x27;",
    "&copy;",
    "&AMP;",
    "&amp",
    "&#128512;",
]
URLS = ["https://example.com/path?q=1&x=2#frag", "www.Foo-Bar.org/a_b/c.html", "mailto:someone@example.com"]
NUMBERS = ["3.14", "1,000,000", "2024-01-01", "42", "0x1F", "½", "²", "٣", "1st", "10km/h"]
PUNCT = [
    "...",
    "!?",
    "—",
    "–",
    "“quoted”",
    "‘single’",
    "(parens)",
    "[x]",
    "{y}",
    "#tag",
    "@user",
    "'s",
    "'ll",
    "don't",
]
ODD = [
    "cafÃ©",  # mojibake ftfy repairs
    "\x1b[31mred\x1b[0m",  # terminal escapes
    "ＡＢＣ ｆｕｌｌ",  # full-width
    "ﬁne ﬂow",  # ligatures
    "a\x00b",  # NUL
    "tab\there",
    "cr\r\nlf",
    "nb\u00a0sp",
    "ideo\u3000space",
    "line\u2028sep",
    "zero\u200bwidth",
    "<start_of_text>",
    "<END_OF_TEXT>",
    "</w>",
    "\ufeffbom",
    "\x7fdel",
    "\x85nel",
]
WHITESPACE = [" ", "  ", "\t", "\n", "   \t\n  ", "\r\n"]


def _random_chars(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _emoji(rng: random.Random) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        return _random_chars(rng, 0x1F300, 0x1FAFF, rng.randint(1, 3))
    if choice == 1:
        return "👩\u200d👩\u200d👧"  # ZWJ sequence
    if choice == 2:
        return "👍" + chr(rng.randint(0x1F3FB, 0x1F3FF))  # skin tone
    if choice == 3:
        return "🇫🇷🇯🇵"  # flags
    return "❤️"


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind <= 2:
        w = rng.choice(WORDS)
        return w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
    table = [None, None, None, ACCENTED, SCRIPTS, ENTITIES, URLS, NUMBERS, PUNCT, ODD]
    if kind < len(table):
        return rng.choice(table[kind])
    if kind == 10:
        return _emoji(rng)
    # random code points: CJK, Hangul, Latin-extended, or anything in the BMP but surrogates
    lo, hi = rng.choice(
        [(0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x100, 0x24F), (0x20, 0xD7FF), (0xE000, 0xFFFD)]
    )
    return _random_chars(rng, lo, hi, rng.randint(1, 6))


def generate_texts(n: int, seed: int = 0) -> list[str]:
    """A seeded mix of everything captions scraped from the web contain."""
    rng = random.Random(seed)
    texts = ["", " ", "\n\t", "a", "A", "!", "&amp;", "<start_of_text>", "x" * 3000]
    while len(texts) < n:
        size = rng.choice([1, 3, 8, 15, 30, 120])  # 120 fragments overflows the 77-token context
        texts.append(joined_pieces(rng, rng.randint(1, size), _fragment, WHITESPACE))
    return texts


_TOK = Tokenizer()
_REF = open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return _TOK


@pytest.fixture(scope="module")
def ref():
    return _REF


@pytest.mark.slow
def test_ids_identical_to_open_clip(tok: Tokenizer, ref) -> None:
    texts = generate_texts(3000)
    assert sum(len(t) > 400 for t in texts) > 100  # the generator does produce over-long texts
    ours, theirs = tok(texts), ref(texts)
    assert ours.shape == theirs.shape == (len(texts), 77)
    mismatched = [i for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, f"{len(mismatched)} texts differ, first: {texts[mismatched[0]]!r}"
    # second pass hits the piece cache and must give the same ids
    assert torch.equal(tok(texts[:500]), theirs[:500])


def test_encode_identical_to_open_clip_without_truncation(tok: Tokenizer, ref) -> None:
    for text in generate_texts(300, seed=1):
        if max(map(len, text.split()), default=0) < MAX_WORD_CHARS:  # see test_degenerate_long_word
            assert tok.encode(text) == ref.encode(text), text


def test_degenerate_long_word(tok: Tokenizer, ref) -> None:
    """A 'word' of thousands of letters is BPE'd in chunks (bounded time); the batched call still
    matches the reference because the first chunk alone overflows the context."""
    rng = random.Random(2)
    for word in ["x" * 3000, "".join(rng.choice("abcdefghij") for _ in range(3000))]:
        assert torch.equal(tok(["a " + word]), ref(["a " + word]))
        assert len(tok.encode(word)) >= MAX_WORD_CHARS // 32


def test_ascii_fast_path_matches_full_clean(tok: Tokenizer, ref) -> None:
    rng = random.Random(3)
    alphabet = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t\n"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    assert torch.equal(tok(texts), ref(texts))
    import ftfy

    for t in texts:
        if "&" not in t:  # the fast path must be an exact no-op of ftfy + unescape
            assert ftfy.fix_text(t) == t


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_property_ids_identical_to_open_clip(text: str) -> None:
    ours, theirs = _TOK(text), _REF(text)
    assert torch.equal(ours, theirs), text


def test_module_tokenize_matches_open_clip_tokenize() -> None:
    texts = ["a diagram", "a dog", "a cat", ""]
    assert torch.equal(tokenize(texts), open_clip.tokenize(texts))
    assert torch.equal(tokenize("a dog", context_length=16), open_clip.tokenize("a dog", context_length=16))


def test_shape_dtype_and_special_ids(tok: Tokenizer) -> None:
    out = tok(["a dog", "a photo of a cat"])
    assert out.dtype == torch.long and out.shape == (2, DEFAULT_CONTEXT_LENGTH)
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    single = tok("a dog")
    assert single.shape == (1, 77)
    assert tok([]).shape == (0, 77)
    assert tok(["a dog"], context_length=10).shape == (1, 10)


def test_empty_string_is_sot_eot(tok: Tokenizer) -> None:
    row = tok("")[0]
    assert row[:2].tolist() == [tok.sot_token_id, tok.eot_token_id]
    assert row[2:].eq(0).all()
    assert tok("   \n\t ")[0].tolist() == row.tolist()


@pytest.mark.parametrize("context_length", [2, 5, 16, 77])
def test_truncation_keeps_eot_last(tok: Tokenizer, ref, context_length: int) -> None:
    text = " ".join(["photograph"] * 200)
    row = tok(text, context_length=context_length)[0]
    assert row.shape == (context_length,)
    assert row[0] == tok.sot_token_id and row[-1] == tok.eot_token_id
    assert (row[1:-1] != tok.eot_token_id).all()
    assert torch.equal(row, ref(text, context_length=context_length)[0])


def test_exact_fit_is_not_truncated(tok: Tokenizer) -> None:
    ids = tok.encode(" ".join(["dog"] * 75))
    assert len(ids) == 75
    row = tok(" ".join(["dog"] * 75))[0].tolist()
    assert row == [tok.sot_token_id, *ids, tok.eot_token_id]
    over = tok(" ".join(["dog"] * 76))[0].tolist()
    assert over == [tok.sot_token_id, *ids, tok.eot_token_id]  # 76th word dropped, EOT kept


def test_decode_round_trip_plain_text(tok: Tokenizer) -> None:
    rng = random.Random(5)
    for _ in range(200):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok(text)[0]) == text  # padded row: SOT dropped, stops at EOT
    assert tok.decode(tok.encode("Café Straße 日本語 😀")) == "café straße 日本語 😀"
    # CLIP BPE does not record spaces before punctuation; only spacing is lost
    text = "hello, world! it's 42."
    assert tok.decode(tok.encode(text)).replace(" ", "") == clean_text(text).replace(" ", "")
    kept = tok.decode(tok("a dog")[0, :4], skip_special_tokens=False)
    assert kept.startswith("<start_of_text>a dog") and "<end_of_text>" in kept
    assert decode(tokenize("a red bus")[0]) == "a red bus"
    assert tok.batch_decode(tok(["one", "two words"])) == ["one", "two words"]


def test_longest_vocabulary_entry_bounds_word_cut(tok: Tokenizer) -> None:
    """The batched call cuts giant words at MAX_TOKEN_CHARS * context: that relies on no token
    spanning more than MAX_TOKEN_CHARS characters."""
    longest = max(len(t.replace("</w>", "")) for t in tok._vocab.encoder if not t.startswith("<"))
    assert longest <= _MAX_TOKEN_CHARS


def test_small_cache_evicts_and_stays_correct(ref) -> None:
    small = Tokenizer(cache_size=8)
    texts = generate_texts(200, seed=9)
    assert torch.equal(small(texts), ref(texts))
    assert len(small._word_cache) <= 8


def test_decode_rejects_unknown_ids(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([49408])


def test_pickle_and_config_round_trip(tok: Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    texts = ["A photo of a dog &amp; a cat", "日本語"]
    assert torch.equal(clone(texts), tok(texts))
    cfg = Tokenizer(context_length=32, clean="whitespace").to_dict()
    again = Tokenizer.from_dict(cfg)
    assert again.context_length == 32 and again.clean == "whitespace"
    assert again("A Dog").shape == (1, 32)
    assert again.decode(again.encode("A Dog")) == "A Dog"  # no lower-casing in this mode
    canon = Tokenizer(clean="canonicalize")
    assert canon.decode(canon.encode("Hello, World_wide!")) == "hello world wide"


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="context_length"):
        Tokenizer(context_length=1)
    with pytest.raises(ConfigError, match="clean"):
        Tokenizer(clean="nope")
    with pytest.raises(ConfigError, match="unknown tokenizer config"):
        Tokenizer.from_dict({"context_length": 77, "vocab": 3})
    with pytest.raises(ConfigError, match="cannot read BPE merges file"):
        Tokenizer(bpe_path="/nonexistent/merges.txt.gz")
    with pytest.raises(TypeError, match="index 1"):
        Tokenizer()(["ok", None])  # type: ignore[list-item]

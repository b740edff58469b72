"""Hugging Face tokenizers (SigLIP T5, SigLIP 2 Gemma, XLM-R, mT5, NLLB, CLIPA BERT) vs open_clip.

Each kind is a tiny SentencePiece (or WordPiece) model trained here in about a second on generated
multilingual text, wrapped in transformers' own class with the options open_clip's Hub tokenizers
were made with (SigLIP: T5 with ``extra_ids=0`` padding with ``</s>``; SigLIP 2: Gemma with
``add_eos_token``, right padding) and saved with ``save_pretrained``. clipforge's ids must equal
open_clip's ``HFTokenizer`` (oracle) built on the same folder, string for string, at the context
lengths and ``tokenizer_kwargs`` of open_clip's configs. Nothing is downloaded: Hub ids resolve
from a hub cache laid out under a temporary ``HF_HUB_CACHE``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import helpers
import pytest
import torch
from helpers import REVISION

from clipforge.errors import ConfigError, DownloadError
from clipforge.hf_tokenizer import HFTokenizer, resolve_tokenizer_dir
from clipforge.tokenizer import Tokenizer, clean_text

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer  # noqa: E402
from open_clip.tokenizer import get_clean_fn  # noqa: E402

OPEN_CLIP_CONFIGS = Path(open_clip.__file__).parent / "model_configs"

# --- generated text -------------------------------------------------------------------------------
ENGLISH = (
    "a an the photo picture of with on in at and dog cat bird car tree house street city night day red "
    "blue green black white small big old new two three people man woman child playing running sitting "
    "standing beach mountain river sky snow water food table chair window door flower"
).split()
SYLLABLES = {
    "latin": ("bcdfghjklmnprstvwz", "aeiouyäöüéèàñ"),
    "cyrillic": ("бвгдзклмнпрст", "аеиоуыя"),
    "greek": ("βγδκλμνπρστ", "αεηιουω"),
}
ODD = [
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "&#128512;", "cafÃ©", "ﬁne ﬂow", "ＡＢＣ ｆｕｌｌ",
    "\x1b[31mred\x1b[0m", "a\x00b", "nb\u00a0sp", "ideo\u3000space", "zero\u200bwidth", "\ufeffbom",
    "</s>", "<pad>", "<s>", "<unk>", "[SEP]", "[CLS]", "<eos>", "<bos>", "eng_Latn", "▁", "snake_case_name",
    "CamelCaseWord", "don't", "it's", "“quoted”", "(parens)", "#tag", "@user", "3.14", "1,000,000", "½",
    "https://example.com/a_b?q=1&x=2", "🇫🇷🇯🇵", "👩\u200d👩\u200d👧", "❤️", "😀", "🐶", "…", "—",
]  # fmt: skip
WHITESPACE = [" ", "  ", "\t", "\n", "   \t\n  ", "\r\n", "\u2028"]


def _word(rng: random.Random) -> str:
    """One word: English (some capitalised or upper-case), a syllable word in one of three scripts,
    CJK or kana characters (partly outside what the tiny vocabularies saw), digits, or an odd piece."""
    r = rng.random()
    if r < 0.4:
        w = rng.choice(ENGLISH)
        return w.upper() if rng.random() < 0.05 else w.capitalize() if rng.random() < 0.2 else w
    if r < 0.7:
        consonants, vowels = SYLLABLES[rng.choice(list(SYLLABLES))]
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        return w.capitalize() if rng.random() < 0.1 else w
    if r < 0.8:
        return "".join(chr(0x4E00 + rng.randrange(600)) for _ in range(rng.randint(1, 3)))
    if r < 0.85:
        return "".join(chr(0x3041 + rng.randrange(80)) for _ in range(rng.randint(1, 4)))
    if r < 0.9:
        return str(rng.randrange(100000))
    return rng.choice(ODD)


def corpus(n: int, seed: int) -> list[str]:
    """Training lines for the tiny tokenizers."""
    rng = random.Random(seed)
    return [" ".join(_word(rng) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def varied_texts(n: int, seed: int) -> list[str]:
    """Captions as scraped: mixed scripts and case, punctuation, entities, whitespace runs, empty
    strings, and texts of 150-400 words that overflow even a 256-token context."""
    rng = random.Random(seed)
    texts = ["", " ", "\t\n", "a", "A", "!!!", "...", "_", "x" * 3000, " ".join(ODD), "   lead and trail   "]
    while len(texts) < n:
        r = rng.random()  # a few long texts (ftfy makes open_clip's cleaning cost ~1 ms per 1k chars)
        size = 400 if r < 0.03 else 150 if r < 0.06 else rng.choice([1, 2, 5, 10, 20, 40, 60])
        texts.append(helpers.joined_pieces(rng, rng.randint(1, size), _word, WHITESPACE))
    return texts


# --- tiny tokenizers of each kind ------------------------------------------------------------------
def _spm(path: Path, lines: list[str], **options) -> Path:
    import sentencepiece as spm

    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(path.with_suffix(""))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, character_coverage=1.0, minloglevel=2,
        hard_vocab_limit=False, **{"vocab_size": 1000, **options},
    )  # fmt: skip
    os.replace(prefix + ".model", path)
    os.remove(prefix + ".vocab")
    return path.parent


def _siglip(src: Path, lines: list[str]):
    """open_clip's SigLIP tokenizer: T5 SentencePiece, extra_ids=0, pad and EOS both ``</s>`` (1)."""
    from transformers import T5TokenizerFast

    folder = _spm(src / "spiece.model", lines, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    tok = T5TokenizerFast.from_pretrained(folder, extra_ids=0, legacy=False)
    tok.pad_token_id, tok.eos_token_id = 1, 1
    return tok


def _siglip2(src: Path, lines: list[str]):
    """open_clip's SigLIP 2 tokenizer: Gemma BPE with byte fallback, no BOS, EOS added, right padding."""
    from transformers import GemmaTokenizerFast

    folder = _spm(
        src / "tokenizer.model", lines, model_type="bpe", byte_fallback=True, vocab_size=1200,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True,
    )  # fmt: skip
    tok = GemmaTokenizerFast.from_pretrained(
        folder, padding_side="right", add_bos_token=False, add_eos_token=True
    )
    tok.pad_token_id, tok.eos_token_id = 0, 1
    return tok


def _mt5(src: Path, lines: list[str]):
    """google/mt5-base: T5 SentencePiece with the 100 sentinel ids."""
    from transformers import T5TokenizerFast

    folder = _spm(src / "spiece.model", lines, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    return T5TokenizerFast.from_pretrained(folder, legacy=False)


def _xlmr(src: Path, lines: list[str]):
    """xlm-roberta-base: fairseq ids (<s>=0 <pad>=1 </s>=2) over a unigram SentencePiece."""
    from transformers import XLMRobertaTokenizerFast

    return XLMRobertaTokenizerFast.from_pretrained(
        _spm(src / "sentencepiece.bpe.model", lines, model_type="unigram")
    )


def _nllb(src: Path, lines: list[str]):
    """facebook/nllb-200: BPE SentencePiece, language code first (a few codes, eng_Latn by default)."""
    from transformers import NllbTokenizerFast

    folder = _spm(src / "sentencepiece.bpe.model", lines, model_type="bpe")
    codes = ["eng_Latn", "fra_Latn", "deu_Latn", "zho_Hans"]
    return NllbTokenizerFast.from_pretrained(folder, extra_special_tokens=codes, src_lang="eng_Latn")


def _bert(src: Path, lines: list[str]):
    """bert-base-uncased (CLIPA): lower-casing WordPiece, [CLS] text [SEP]."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(lines, vocab_size=1000)
    src.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(src))
    return BertTokenizerFast.from_pretrained(src, do_lower_case=True)


BUILDERS = {"siglip": _siglip, "siglip2": _siglip2, "mt5": _mt5, "xlmr": _xlmr, "nllb": _nllb, "bert": _bert}
#: The Hub repos open_clip's configs name for each kind (populated in the temporary hub cache), with
#: the ``config.json`` each holds (transformers 5's AutoTokenizer reads it for a Hub id).
TIMM_CONFIG = {"architecture": "vit_base_patch16_siglip_224", "num_classes": 0}
HUB_NAMES = {
    "siglip": ("timm/ViT-B-16-SigLIP", TIMM_CONFIG),
    "siglip2": ("timm/ViT-B-16-SigLIP2", TIMM_CONFIG),
    "mt5": ("google/mt5-base", {"model_type": "mt5"}),
    "xlmr": ("xlm-roberta-base", {"model_type": "xlm-roberta"}),
    "nllb": ("facebook/nllb-200-distilled-600M", {"model_type": "m2m_100"}),
    "bert": ("bert-base-uncased", {"model_type": "bert"}),
}


def populate(cache: Path, repo: str, folder: Path, extra: dict[str, bytes] | None = None) -> Path:
    """``folder``'s files (and ``extra``) as a Hub repo whose snapshot links into blobs/, as
    huggingface_hub lays it out (the tokenizer must follow those links)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()} | (extra or {})
    return helpers.populate(cache, repo, files, blobs=True)


@pytest.fixture(scope="session")
def kinds(tmp_path_factory) -> dict[str, Path]:
    """Each kind trained once and saved with ``save_pretrained`` (tokenizer.json + tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("hf-tokenizers")
    folders = {}
    for i, (kind, build) in enumerate(BUILDERS.items()):
        tok = build(root / f"src-{kind}", corpus(500, seed=i))
        tok.save_pretrained(root / kind)
        folders[kind] = root / kind
    return folders


@pytest.fixture(scope="session")
def hub_cache(kinds, tmp_path_factory) -> Path:
    """A hub cache holding every kind under the repo id open_clip's configs name."""
    cache = tmp_path_factory.mktemp("hub-cache")
    for kind, (repo, config) in HUB_NAMES.items():
        populate(cache, repo, kinds[kind], {"config.json": json.dumps(config).encode()})
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    """``HF_HUB_OFFLINE`` for clipforge (read per call) and huggingface_hub (read at import)."""
    import huggingface_hub.constants

    helpers.go_offline(monkeypatch, hub_cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def assert_same_ids(ours: torch.Tensor, theirs: torch.Tensor, texts: list[str]) -> None:
    assert ours.dtype == torch.long and ours.shape == theirs.shape, (ours.shape, theirs.shape)
    bad = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    assert not bad, (
        f"{len(bad)}/{len(texts)} rows differ; first: {texts[bad[0]]!r}\n{ours[bad[0]]}\n{theirs[bad[0]]}"
    )


# --- parity with open_clip's HFTokenizer ----------------------------------------------------------
#: (kind, tokenizer_kwargs as in open_clip's configs, context lengths).
PARITY = [
    ("siglip", {"clean": "canonicalize"}, (64, 256)),  # ViT-*-SigLIP*
    ("siglip2", {"clean": "canonicalize"}, (64,)),  # ViT-*-SigLIP2*
    ("mt5", {"clean": "canonicalize"}, (77,)),  # ViT-L-14-worldwide
    ("xlmr", {}, (77,)),  # xlm-roberta-*-ViT-*, ViT-*-worldwide (xlm-v)
    ("xlmr", {"strip_sep_token": True, "clean": "lower"}, (64,)),
    ("xlmr", {"tokenizer_mode": "clips"}, (77,)),
    ("nllb", {}, (77,)),  # nllb-clip-*
    ("bert", {"strip_sep_token": True}, (32,)),  # ViT-*-CLIPA*
]


PARITY_IDS = [f"{k}-{'-'.join(map(str, kw.values())) or 'default'}" for k, kw, _ in PARITY]


@pytest.mark.parametrize("index", range(len(PARITY)), ids=PARITY_IDS)
def test_ids_equal_open_clip(kinds, index) -> None:
    kind, kwargs, lengths = PARITY[index]
    texts = varied_texts(1000, seed=100 + index)
    ours = HFTokenizer(str(kinds[kind]), lengths[0], **kwargs)
    theirs = OpenClipHFTokenizer(str(kinds[kind]), context_length=lengths[0], **kwargs)
    sizes = [len(ids) for ids in ours.tokenizer([clean_text(t, ours.clean) for t in texts]).input_ids]
    for length in lengths:
        a, b = ours(texts, context_length=length), theirs(texts, context_length=length)
        assert_same_ids(a, b, texts)
        assert a.shape == (len(texts), length)
        # the set exercises both truncated rows and padded ones at every length
        assert sum(n > length for n in sizes) > 20 and sum(n < length for n in sizes) > 200, length
    if kwargs.get("strip_sep_token"):
        sep = ours.tokenizer.sep_token_id
        assert (b == 0).any() and not (a == sep).any() and (ours.tokenizer(["a"]).input_ids[0][-1] == sep)


def test_cleaning_is_open_clips() -> None:
    """clipforge's ``clean_text`` (reused, not rewritten) equals open_clip's cleaners string for string."""
    texts = varied_texts(600, seed=11)
    for mode in ("canonicalize", "lower", "whitespace"):
        fn = get_clean_fn(mode)
        diffs = [t for t in texts if clean_text(t, mode) != fn(t)]
        assert not diffs, (mode, diffs[:3])


def test_pad_and_eos_ids_per_kind(kinds) -> None:
    """The special ids each kind pads and ends with (the ones the text towers were trained on)."""
    expect = {  # kind: (pad id, eos/end id, first id of "a dog")
        "siglip": (1, 1, None),
        "siglip2": (0, 1, None),
        "mt5": (0, 1, None),
        "xlmr": (1, 2, 0),
        "nllb": (1, 2, "eng_Latn"),
        "bert": (0, "[SEP]", "[CLS]"),
    }
    for kind, (pad, eos, first) in expect.items():
        tok = HFTokenizer(str(kinds[kind]), 16)
        row = tok("a dog")[0].tolist()
        hf = tok.tokenizer
        eos_id = hf.convert_tokens_to_ids(eos) if isinstance(eos, str) else eos
        n = row.index(eos_id)
        assert tok.pad_token_id == pad and set(row[n + 1 :]) == {pad}, (kind, row)
        assert tok.eot_token_id == eos_id, kind
        if first is not None:
            assert row[0] == (hf.convert_tokens_to_ids(first) if isinstance(first, str) else first), (
                kind,
                row,
            )
        assert tok.decode(row) == "a dog", (kind, tok.decode(row))


def test_nllb_language(kinds) -> None:
    """``language`` selects NLLB's source-language code (the first id), as transformers' ``src_lang``
    does. open_clip's ``set_language`` calls ``set_src_lang_special_tokens``, which transformers
    undoes on every call (``_switch_to_input_mode``), so open_clip always tokenises as eng_Latn."""
    from transformers import AutoTokenizer

    texts = varied_texts(200, seed=5)
    ours = HFTokenizer(str(kinds["nllb"]), 77, language="fra_Latn")
    ref = AutoTokenizer.from_pretrained(str(kinds["nllb"]), src_lang="fra_Latn")
    expected = ref([clean_text(t, "whitespace") for t in texts], return_tensors="pt", max_length=77,
                   padding="max_length", truncation=True).input_ids  # fmt: skip
    assert_same_ids(ours(texts), expected, texts)
    fra, eng = (ours.tokenizer.convert_tokens_to_ids(c) for c in ("fra_Latn", "eng_Latn"))
    assert set(ours(texts)[:, 0].tolist()) == {fra} and fra != eng
    default = HFTokenizer(str(kinds["nllb"]), 77)
    assert torch.equal(default(texts)[:, 1:], ours(texts)[:, 1:])
    ours.set_language("deu_Latn")
    assert ours(["x"])[0, 0] == ours.tokenizer.convert_tokens_to_ids("deu_Latn")
    assert pickle.loads(pickle.dumps(ours))(["x"])[0, 0] == ours(["x"])[0, 0]
    assert HFTokenizer.from_dict(ours.to_dict())(["x"])[0, 0] == ours(["x"])[0, 0]
    with pytest.raises(ConfigError, match="xx_Yyyy.*eng_Latn"):
        ours.set_language("xx_Yyyy")
    with pytest.raises(ConfigError, match="no source language"):
        HFTokenizer(str(kinds["siglip"]), 64, language="fra_Latn")


# --- the tokenizer object: settings, pickling, decoding ---------------------------------------------
def test_dict_and_pickle_round_trip(kinds) -> None:
    texts = varied_texts(200, seed=3)
    tok = HFTokenizer(str(kinds["bert"]), 32, strip_sep_token=True)
    d = tok.to_dict()
    assert d == {"type": "hf", "name": str(kinds["bert"]), "context_length": 32, "clean": "whitespace",
                 "strip_sep_token": True}  # fmt: skip
    assert json.loads(json.dumps(d)) == d
    for other in (HFTokenizer.from_dict(d), pickle.loads(pickle.dumps(tok))):
        assert other.to_dict() == d
        assert torch.equal(other(texts), tok(texts))
    # open_clip passes unknown tokenizer_kwargs to from_pretrained; so does from_dict
    lower = HFTokenizer.from_dict({**d, "do_lower_case": False})
    assert lower.hf_kwargs == {"do_lower_case": False} and lower.to_dict()["hf_kwargs"] == {
        "do_lower_case": False
    }
    assert not torch.equal(lower(["DOG Cat"]), tok(["DOG Cat"]))


class _Captions(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], tokenizer: HFTokenizer) -> None:
        self.texts, self.tokenizer = texts, tokenizer

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokenizer(self.texts[i])[0]


def test_dataloader_workers(kinds) -> None:
    """Two forked DataLoader workers tokenise as the main process does (the tokenizer pickles)."""
    import multiprocessing

    texts = varied_texts(64, seed=4)
    tok = HFTokenizer(str(kinds["siglip2"]), 64, clean="canonicalize")
    loader = torch.utils.data.DataLoader(
        _Captions(texts, tok),
        batch_size=16,
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context("fork"),
    )
    assert_same_ids(torch.cat(list(loader)), tok(texts), texts)


def test_decode_and_batch_decode(kinds) -> None:
    tok = HFTokenizer(str(kinds["siglip"]), 64, clean="canonicalize")
    rows = tok(["A Photo, of the DOG!", "", "a red car"])
    assert tok.batch_decode(rows) == ["a photo of the dog", "", "a red car"]
    assert tok.decode(rows[0].tolist()) == "a photo of the dog"
    assert tok.encode("A dog!") == tok.tokenizer("a dog", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size + 5])
    with pytest.raises(TypeError, match="index 1"):
        tok(["ok", 3])
    assert tok([]).shape == (0, 64)


def test_bad_options_are_config_errors(kinds) -> None:
    folder = str(kinds["xlmr"])
    with pytest.raises(ConfigError, match="clean='upper'"):
        HFTokenizer(folder, 77, clean="upper")
    with pytest.raises(ConfigError, match="context_length"):
        HFTokenizer(folder, 1)
    with pytest.raises(ConfigError, match="tokenizer_mode"):
        HFTokenizer(folder, 77, tokenizer_mode="bert_clips")
    with pytest.raises(ConfigError, match="needs 'name'"):
        HFTokenizer.from_dict({"type": "hf", "context_length": 77})
    with pytest.raises(ConfigError, match="'clips' needs BOS"):
        HFTokenizer(str(kinds["siglip"]), 64, tokenizer_mode="clips")(["a"])


# --- offline resolution -----------------------------------------------------------------------------
def test_hub_ids_resolve_from_the_cache(offline, kinds) -> None:
    """Hub ids (plain, ``hf-hub:`` and ``@revision``) load from the cache's snapshot, no network."""
    texts = varied_texts(150, seed=9)
    snapshot = offline / "models--timm--ViT-B-16-SigLIP" / "snapshots" / REVISION
    expected = HFTokenizer(str(kinds["siglip"]), 64, clean="canonicalize")(texts)
    for name in ("timm/ViT-B-16-SigLIP", "hf-hub:timm/ViT-B-16-SigLIP", f"timm/ViT-B-16-SigLIP@{REVISION}"):
        tok = HFTokenizer(name, 64, clean="canonicalize")
        assert tok.folder == snapshot
        assert_same_ids(tok(texts), expected, texts)
    oracle = OpenClipHFTokenizer("timm/ViT-B-16-SigLIP", 64, clean="canonicalize", cache_dir=str(offline))
    assert_same_ids(
        HFTokenizer("timm/ViT-B-16-SigLIP", 64, clean="canonicalize")(texts), oracle(texts), texts
    )
    # a cache copied without refs/ still resolves (newest snapshot with the files)
    snapshot = populate(offline, "test-org/no-refs", kinds["bert"])
    (offline / "models--test-org--no-refs" / "refs" / "main").unlink()
    assert resolve_tokenizer_dir("test-org/no-refs") == snapshot


def test_missing_tokenizer_names_repo_files_and_fix(offline, tmp_path) -> None:
    with pytest.raises(DownloadError) as err:
        HFTokenizer("test-org/absent", 64)
    message = str(err.value)
    for part in ("test-org/absent", "tokenizer.json", "tokenizer_config.json", "hf download test-org/absent",
                 "models--test-org--absent", "never downloads"):  # fmt: skip
        assert part in message, (part, message)
    # a snapshot with only part of the files says what it lacks
    partial = tmp_path / "partial-src"
    partial.mkdir()
    (partial / "tokenizer_config.json").write_text("{}")
    populate(offline, "test-org/partial", partial)
    with pytest.raises(DownloadError, match=r"missing a vocabulary.*holds \['tokenizer_config.json'\]"):
        HFTokenizer("test-org/partial", 64)
    with pytest.raises(ConfigError, match="missing tokenizer_config.json or tokenizer.json"):
        HFTokenizer(str(offline / "models--test-org--partial"), 64)
    with pytest.raises(ConfigError, match="neither an existing folder nor"):
        HFTokenizer("not/a/repo/id", 64)


# --- wiring: model configs, folders and Hub repos ----------------------------------------------------
OPEN_CLIP_NAMES = {  # open_clip config -> kind of its hf_tokenizer_name
    "ViT-B-16-SigLIP": "siglip",
    "ViT-SO400M-14-SigLIP": "siglip",  # context 16
    "ViT-B-16-SigLIP2": "siglip2",
    "ViT-L-14-worldwide": "mt5",
    "xlm-roberta-base-ViT-B-32": "xlmr",
    "nllb-clip-base": "nllb",
    "ViT-L-14-CLIPA": "bert",
}


def test_open_clip_configs_get_their_tokenizer(offline) -> None:
    """``get_tokenizer(<open_clip config>)`` == ``open_clip.get_tokenizer(<name>)``: the config's
    hf_tokenizer_name, context length and tokenizer_kwargs, resolved from the hub cache."""
    from clipforge.factory import get_tokenizer

    texts = varied_texts(200, seed=21)
    for name in OPEN_CLIP_NAMES:
        ours = get_tokenizer(str(OPEN_CLIP_CONFIGS / f"{name}.json"))
        theirs = open_clip.get_tokenizer(name, cache_dir=str(offline), local_files_only=True)
        assert isinstance(ours, HFTokenizer) and ours.context_length == theirs.context_length, name
        assert_same_ids(ours(texts), theirs(texts), texts)
    assert isinstance(get_tokenizer("ViT-B-32"), Tokenizer)  # CLIP BPE stays the default


def _tiny_siglip_cfg(hf_tokenizer_name: str) -> dict:
    return {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 64, "vocab_size": 1300, "width": 32, "heads": 2, "layers": 1,
                     "hf_tokenizer_name": hf_tokenizer_name, "tokenizer_kwargs": {"clean": "canonicalize"},
                     "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
    }  # fmt: skip


def _open_clip_repo(folder: Path, model_cfg: dict, tokenizer_dir: Path | None) -> Path:
    """An open_clip Hub-style folder: open_clip_config.json, random weights, tokenizer files beside."""
    from clipforge.checkpoints.io import save_safetensors
    from clipforge.checkpoints.open_clip import clipforge_to_open_clip
    from clipforge.checkpoints.open_clip_config import config_from_open_clip
    from clipforge.model.build import build_model

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model(config_from_open_clip(model_cfg))
    save_safetensors(clipforge_to_open_clip(model.state_dict()), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    for p in tokenizer_dir.iterdir() if tokenizer_dir else ():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_model_folder_and_hub_repo_carry_the_tokenizer(offline, kinds, tmp_path) -> None:
    """Tokenizer files next to the weights win (open_clip's local-dir:), for folders and Hub repos;
    ``model.tokenizer_cfg`` records them and survives a clipforge checkpoint round trip."""
    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model, get_tokenizer

    texts = varied_texts(150, seed=13)
    # hf_tokenizer_name names a repo that is not cached: only the files beside the weights exist
    folder = _open_clip_repo(
        tmp_path / "tiny-siglip", _tiny_siglip_cfg("test-org/not-cached"), kinds["siglip2"]
    )
    theirs = open_clip.get_tokenizer(f"local-dir:{folder}")
    model = create_model(pretrained=str(folder))
    assert model.tokenizer_cfg["type"] == "hf" and model.tokenizer_cfg["local_dir"] == str(folder.resolve())
    for ours in (get_tokenizer(model), get_tokenizer(str(folder))):
        assert ours.folder == folder.resolve() and ours.context_length == 64
        assert_same_ids(ours(texts), theirs(texts), texts)
    # saved as a clipforge checkpoint, the settings come back
    save_pretrained(model, tmp_path / "saved")
    stored = json.loads((tmp_path / "saved" / "config.json").read_text())["tokenizer_cfg"]
    assert (
        stored["type"] == "hf"
        and stored["name"] == "test-org/not-cached"
        and stored["clean"] == "canonicalize"
    )
    assert_same_ids(get_tokenizer(str(tmp_path / "saved"))(texts), theirs(texts), texts)
    assert_same_ids(
        get_tokenizer(create_model(pretrained=str(tmp_path / "saved")))(texts), theirs(texts), texts
    )
    # tokenizer files saved into the checkpoint make it self-contained (the first folder is gone)
    get_tokenizer(model).save_pretrained(tmp_path / "saved")
    folder.rename(tmp_path / "moved")
    ours = get_tokenizer(str(tmp_path / "saved"))
    assert ours.folder == (tmp_path / "saved").resolve()
    assert_same_ids(ours(texts), theirs(texts), texts)
    # a Hub repo naming itself as hf_tokenizer_name, as timm's SigLIP repos do (open_clip: hf-hub:)
    repo = _open_clip_repo(tmp_path / "hub-repo", _tiny_siglip_cfg("test-org/tiny-siglip"), kinds["siglip2"])
    snapshot = populate(
        offline, "test-org/tiny-siglip", repo, {"config.json": json.dumps(TIMM_CONFIG).encode()}
    )
    theirs = open_clip.get_tokenizer(
        "hf-hub:test-org/tiny-siglip", cache_dir=str(offline), local_files_only=True
    )
    hub_model = create_model("hf-hub:test-org/tiny-siglip")
    for ours in (get_tokenizer("hf-hub:test-org/tiny-siglip"), get_tokenizer(hub_model)):
        assert ours.folder == snapshot.resolve() or ours.folder == snapshot
        assert_same_ids(ours(texts), theirs(texts), texts)


def test_model_without_tokenizer_files_uses_the_cache(offline, kinds, tmp_path) -> None:
    """A folder with weights only: hf_tokenizer_name resolves from the hub cache; a name that is
    not there fails naming both places looked at."""
    from clipforge.checkpoints.open_clip_config import config_from_open_clip
    from clipforge.factory import create_model, get_tokenizer
    from clipforge.model.build import build_model

    texts = varied_texts(150, seed=17)
    folder = _open_clip_repo(tmp_path / "weights-only", _tiny_siglip_cfg("timm/ViT-B-16-SigLIP"), None)
    ours = get_tokenizer(create_model(pretrained=str(folder)))
    assert "local_dir" not in ours.to_dict() and ours.name == "timm/ViT-B-16-SigLIP"
    oracle = OpenClipHFTokenizer("timm/ViT-B-16-SigLIP", 64, clean="canonicalize", cache_dir=str(offline))
    assert_same_ids(ours(texts), oracle(texts), texts)
    # a model built from a config alone (no checkpoint) gets the same tokenizer
    config = config_from_open_clip(_tiny_siglip_cfg("timm/ViT-B-16-SigLIP"))
    assert_same_ids(get_tokenizer(build_model(config))(texts), oracle(texts), texts)
    assert_same_ids(get_tokenizer(config)(texts), oracle(texts), texts)
    absent = _open_clip_repo(tmp_path / "absent", _tiny_siglip_cfg("test-org/absent"), None)
    with pytest.raises(DownloadError, match="test-org/absent"):
        get_tokenizer(str(absent))

"""Hugging Face tokenizers for the towers that do not use CLIP's BPE, with open_clip's semantics.

SigLIP (T5 SentencePiece), SigLIP 2 (Gemma), the multilingual towers (XLM-R, mT5, NLLB) and
CLIPA (BERT) were trained on ids from a ``transformers`` tokenizer, wrapped by open_clip's
``HFTokenizer``. Ids must match it exactly or the text tower sees a different language, so
this wrapper does what that one does and nothing more: clean the text with CLIP's cleaners
(:func:`clipforge.tokenizer.clean_text`: ``canonicalize`` for SigLIP, ``whitespace`` by default),
call the tokenizer with ``padding="max_length", truncation=True`` (so pad and EOS ids are the
tokenizer's own: SigLIP pads with ``</s>``=1, XLM-R/NLLB with 1, Gemma/T5/BERT with 0) and, with
``strip_sep_token``, zero the separator (CLIPA's BERT).

Loading never touches the network: ``name`` is a folder, or a Hub id looked up in the local hub
cache (as with ``HF_HUB_OFFLINE=1``); a model folder holding tokenizer files next to its weights
(open_clip Hub repos do) is searched first. A miss names the repository, the files and how to
fetch them, instead of a transformers traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import ConfigError, DownloadError
from clipforge.tokenizer import CLEAN_MODES, DEFAULT_CONTEXT_LENGTH, clean_text

TOKENIZER_TYPE = "hf"
#: Files a tokenizer folder describes itself with (at least one of them must exist).
CONFIG_FILES = ("tokenizer_config.json", "tokenizer.json")
#: Vocabulary files transformers builds a tokenizer from (``tokenizer.json`` suffices alone).
VOCAB_FILES = (
    "tokenizer.json",
    "spiece.model",  # T5 / mT5 / SigLIP
    "tokenizer.model",  # Gemma / SigLIP 2
    "sentencepiece.bpe.model",  # XLM-R / NLLB
    "sentencepiece.model",
    "vocab.txt",  # BERT
    "vocab.json",  # RoBERTa / GPT-2 (with merges.txt)
)
#: ``hf download --include`` patterns that fetch a repository's tokenizer files, whichever it has.
DOWNLOAD_PATTERNS = ("tokenizer*", "special_tokens_map.json", "*.model", "vocab.*", "merges.txt")
#: open_clip ``tokenizer_kwargs`` this wrapper interprets; any other key goes to ``from_pretrained``.
_OWN_KEYS = ("clean", "strip_sep_token", "language", "tokenizer_mode")
_MODES = (None, "clips")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


# --- finding the files ------------------------------------------------------------------------------
def has_tokenizer_files(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` holds a tokenizer transformers can load (a description and a vocabulary)."""
    if folder is None or not Path(folder).is_dir():
        return False
    path = Path(folder)
    return any((path / n).is_file() for n in CONFIG_FILES) and any((path / n).is_file() for n in VOCAB_FILES)


def _missing(folder: Path) -> str:
    """The part of a tokenizer's files ``folder`` lacks, in words."""
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    needs = []
    if not any((folder / n).is_file() for n in CONFIG_FILES):
        needs.append(" or ".join(CONFIG_FILES))
    if not any((folder / n).is_file() for n in VOCAB_FILES):
        needs.append("a vocabulary (" + ", ".join(VOCAB_FILES) + ")")
    return f"missing {' and '.join(needs)}; it holds {found or 'nothing'}"


def _repo_and_revision(name: str) -> tuple[str, str | None]:
    """``org/name``, ``hf-hub:org/name`` or ``org/name@rev`` (legacy ids like ``bert-base-uncased`` too)."""
    body = name.removeprefix("hf-hub:").strip().strip("/")
    repo, _, revision = body.partition("@")
    if not _REPO_ID.match(repo):
        raise ConfigError(
            f"hf_tokenizer_name {name!r} is neither an existing folder nor a Hugging Face repo id ('org/name')"
        )
    return repo, revision or None


def _cache_root(repo: str, cache_dir: str | os.PathLike | None) -> Path:
    from clipforge.model.hub_files import hub_cache_dir

    return hub_cache_dir(cache_dir) / f"models--{repo.replace('/', '--')}"


def _cached_snapshot(repo: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The snapshot folder of ``repo`` in the local hub cache that holds its tokenizer files.

    The one ``refs/<revision or main>`` points at comes first (huggingface_hub's own lookup); then
    any other snapshot with the files, newest first, for caches copied without their ``refs``.
    """
    root = _cache_root(repo, cache_dir)
    ref = root / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    candidates = [root / "snapshots" / commit] if commit else []
    if revision is None and (root / "snapshots").is_dir():
        others = [p for p in (root / "snapshots").iterdir() if p.is_dir()]
        candidates += sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)
    return next((c for c in candidates if has_tokenizer_files(c)), None)


def _not_cached_error(
    name: str, repo: str, revision: str | None, cache_dir: Any, searched: list[Path]
) -> Exception:
    root = _cache_root(repo, cache_dir)
    snapshots = (
        [p for p in (root / "snapshots").iterdir() if p.is_dir()] if (root / "snapshots").is_dir() else []
    )
    where = "; ".join(f"{s}: {_missing(s)}" for s in snapshots) or f"{root} does not exist"
    looked = "".join(f" Looked first next to the weights in {p} ({_missing(p)})." for p in searched)
    patterns = " ".join(f'"{p}"' for p in DOWNLOAD_PATTERNS)
    rev = f" --revision {revision}" if revision else ""
    return DownloadError(
        f"tokenizer {name!r}: Hugging Face repo {repo} has no tokenizer files in the local hub cache "
        f"({where}); clipforge loads tokenizers offline and never downloads them at run time.{looked} "
        f"Needed: tokenizer.json and tokenizer_config.json (or the vocabulary file, e.g. spiece.model or "
        f"tokenizer.model, that the repo has instead). Fetch them where there is network with "
        f"`hf download {repo}{rev} --include {patterns}` into this cache (HF_HUB_CACHE={root.parent}; "
        f"copy it over if needed), or save the tokenizer to a folder (tokenizer.save_pretrained(folder)) and "
        f"set hf_tokenizer_name to that folder."
    )


def resolve_tokenizer_dir(
    name: str, *, search: Iterable[str | os.PathLike] = (), cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local folder to load tokenizer ``name`` from: ``search`` folders first, then ``name``.

    ``name`` is a folder (it wins when it exists, as in transformers) or a Hub id resolved from the
    local hub cache only. ``search`` holds model folders that may carry the tokenizer beside the
    weights; one without tokenizer files is skipped.
    """
    searched = [Path(p).expanduser() for p in search if p is not None]
    for folder in searched:
        if has_tokenizer_files(folder):
            return folder
    path = Path(name.removeprefix("hf-hub:")).expanduser()
    if path.is_dir():
        if not has_tokenizer_files(path):
            raise ConfigError(f"tokenizer folder {path}: {_missing(path)} (write one with save_pretrained)")
        return path
    repo, revision = _repo_and_revision(name)
    snapshot = _cached_snapshot(repo, revision, cache_dir)
    if snapshot is None:
        raise _not_cached_error(name, repo, revision, cache_dir, searched)
    return snapshot


def load_hf_tokenizer(folder: Path, hf_kwargs: dict[str, Any]) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` with local files only; failures name the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **hf_kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad folders
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"tokenizer folder {folder}: transformers could not load it ({type(e).__name__}: {first}); "
            f"files there: {sorted(p.name for p in folder.iterdir())}"
        ) from None


# --- settings -----------------------------------------------------------------------------------------
def split_tokenizer_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """open_clip's ``tokenizer_kwargs`` as (this wrapper's options, ``from_pretrained`` kwargs)."""
    own = {k: v for k, v in kwargs.items() if k in _OWN_KEYS}
    return own, {k: v for k, v in kwargs.items() if k not in _OWN_KEYS}


def tokenizer_cfg_for(text: Any, model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``tokenizer_cfg`` a ``TextConfig`` implies: CLIP BPE, or ``type: hf`` when it names one.

    ``model_dir`` is the folder the weights came from; it is recorded (and searched first) when it
    carries the tokenizer files, as open_clip Hub repos and ``local-dir:`` folders do.
    """
    name = getattr(text, "hf_tokenizer_name", None)
    if not name:
        return {"type": "clip_bpe", "context_length": text.context_length, "clean": "lower"}
    own, hf_kwargs = split_tokenizer_kwargs(dict(getattr(text, "tokenizer_kwargs", None) or {}))
    cfg: dict[str, Any] = {"type": TOKENIZER_TYPE, "name": name, "context_length": text.context_length, **own}
    if hf_kwargs:
        cfg["hf_kwargs"] = hf_kwargs
    return with_model_dir(cfg, model_dir)


def with_model_dir(cfg: dict[str, Any], model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """``cfg`` searching ``model_dir`` first, when it is a ``type: hf`` one and the folder holds
    tokenizer files; any other ``cfg`` (CLIP BPE) is returned unchanged."""
    if cfg.get("type") == TOKENIZER_TYPE and has_tokenizer_files(model_dir):
        cfg = {**cfg, "local_dir": str(Path(model_dir).expanduser().resolve())}  # type: ignore[arg-type]
    return cfg


def _check_options(context_length: Any, clean: str, tokenizer_mode: str | None) -> None:
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise ConfigError(f"HF tokenizer context_length must be an int >= 2, got {context_length!r}")
    if clean not in CLEAN_MODES:
        raise ConfigError(f"HF tokenizer clean={clean!r} is not one of {CLEAN_MODES}")
    if tokenizer_mode not in _MODES:
        raise ConfigError(f"HF tokenizer tokenizer_mode={tokenizer_mode!r} is not one of {_MODES}")


# --- the tokenizer -----------------------------------------------------------------------------------
class HFTokenizer:
    """A ``transformers`` tokenizer called as open_clip's ``HFTokenizer`` is: texts -> ``LongTensor[N, L]``.

    Args:
        name: Hub id (``"timm/ViT-B-16-SigLIP"``, resolved from the local hub cache) or a folder.
        context_length: row length (SigLIP 64, multilingual towers 77, CLIPA 32...).
        clean: ``"whitespace"`` (open_clip's default), ``"canonicalize"`` (SigLIP) or ``"lower"``.
        strip_sep_token: replace the separator id by 0 (CLIPA's BERT towers).
        language: source language for tokenizers that have one (NLLB's ``"fra_Latn"``).
        tokenizer_mode: ``None`` or open_clip's ``"clips"`` (BOS text EOS, pads, class token last).
        local_dir: a model folder searched for tokenizer files before ``name``.
        cache_dir: hub cache to look in (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        hf_kwargs: extra ``AutoTokenizer.from_pretrained`` arguments (open_clip passes unknown
            ``tokenizer_kwargs`` there).
    """

    def __init__(
        self,
        name: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        *,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        language: str | None = None,
        tokenizer_mode: str | None = None,
        local_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        hf_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"HF tokenizer name must be a Hub id or a folder, got {name!r}")
        _check_options(context_length, clean, tokenizer_mode)
        self.name = name
        self.context_length = context_length
        self.clean = clean
        self.strip_sep_token = bool(strip_sep_token)
        self.tokenizer_mode = tokenizer_mode
        self.local_dir = str(local_dir) if local_dir is not None else None
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.hf_kwargs = dict(hf_kwargs or {})
        search = [self.local_dir] if self.local_dir else []
        self.folder = resolve_tokenizer_dir(name, search=search, cache_dir=cache_dir)
        self.tokenizer = load_hf_tokenizer(self.folder, self.hf_kwargs)
        self.language: str | None = None
        if language is not None:
            self.set_language(language)

    # -- settings (checkpoints' tokenizer_cfg). Pickling (DataLoader workers) is the default one:
    # the transformers tokenizer pickles itself, language included, so workers read no files.
    def to_dict(self) -> dict[str, Any]:
        """Settings stored in checkpoints (``tokenizer_cfg``); :meth:`from_dict` rebuilds from them."""
        d: dict[str, Any] = {
            "type": TOKENIZER_TYPE,
            "name": self.name,
            "context_length": self.context_length,
            "clean": self.clean,
            "strip_sep_token": self.strip_sep_token,
        }
        optional = {
            "language": self.language,
            "tokenizer_mode": self.tokenizer_mode,
            "local_dir": self.local_dir,
        }
        d.update({k: v for k, v in optional.items() if v is not None})
        if self.hf_kwargs:
            d["hf_kwargs"] = dict(self.hf_kwargs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFTokenizer:
        """Inverse of :meth:`to_dict`. Keys open_clip passes on to ``from_pretrained`` (any other
        ``tokenizer_kwargs``) are accepted at the top level too and merged into ``hf_kwargs``."""
        d = dict(d)
        kind = d.pop("type", TOKENIZER_TYPE)
        if kind != TOKENIZER_TYPE:
            raise ConfigError(f"tokenizer_cfg type {kind!r} is not {TOKENIZER_TYPE!r}")
        name = d.pop("name", None)
        if not name:
            raise ConfigError("tokenizer_cfg of type 'hf' needs 'name' (a Hugging Face repo id or a folder)")
        own = {k: d.pop(k) for k in (*_OWN_KEYS, "local_dir", "cache_dir") if k in d}
        own = {k: v for k, v in own.items() if v is not None}
        context_length = d.pop("context_length", None) or DEFAULT_CONTEXT_LENGTH
        hf_kwargs = {**(d.pop("hf_kwargs", None) or {}), **d}
        return cls(name, context_length, hf_kwargs=hf_kwargs, **own)

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.name!r}, context_length={self.context_length}, clean={self.clean!r}, "
            f"strip_sep_token={self.strip_sep_token}, vocab_size={self.vocab_size})"
        )

    # -- ids of the special tokens (what pooling, captioning and decode need) ---------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def eot_token_id(self) -> int | None:
        """End of text: EOS, or the separator for tokenizers without one (BERT)."""
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    @property
    def sot_token_id(self) -> int | None:
        """Start of text: BOS or CLS, None for tokenizers that add neither (T5)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.tokenizer.all_special_ids)

    def set_language(self, language: str) -> None:
        """Source language of multilingual tokenizers (NLLB's ``"eng_Latn"`` codes)."""
        setter = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
        if not callable(setter):
            raise ConfigError(
                f"tokenizer {self.name!r} ({type(self.tokenizer).__name__}) has no source language to set "
                f"(language={language!r}); only NLLB-style tokenizers do"
            )
        tok = self.tokenizer
        if tok.convert_tokens_to_ids(language) in (None, tok.unk_token_id):
            codes = [t for t in tok.all_special_tokens if re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", t)]
            raise ConfigError(
                f"tokenizer {self.name!r}: language {language!r} is not one of its codes ({codes[:8]}"
                f"{' ...' if len(codes) > 8 else ''})"
            )
        # transformers re-applies ``src_lang`` on every call (``_switch_to_input_mode``), undoing a bare
        # ``set_src_lang_special_tokens`` (open_clip's ``set_language``); setting the property sticks.
        if hasattr(tok, "src_lang"):
            tok.src_lang = language
        else:
            setter(language)
        self.language = language

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer's files (e.g. next to exported weights, for offline use)."""
        self.tokenizer.save_pretrained(str(directory))

    # -- tokenising -------------------------------------------------------------------------------
    def _cleaned(self, texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenizer expects str texts, got {type(text).__name__} at index {i}")
            out.append(clean_text(text, self.clean))
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``LongTensor[N, context_length]``: cleaned, tokenised, padded to and truncated at the length."""
        length = context_length or self.context_length
        if not isinstance(length, int) or length < 2:
            raise ConfigError(f"context_length must be an int >= 2, got {length!r}")
        cleaned = self._cleaned(texts)
        if not cleaned:
            return torch.zeros((0, length), dtype=torch.long)
        if self.tokenizer_mode == "clips":
            return self._clips(cleaned, length)
        ids = self.tokenizer(
            cleaned, return_tensors="pt", max_length=length, padding="max_length", truncation=True
        ).input_ids
        sep = self.tokenizer.sep_token_id
        if self.strip_sep_token and sep is not None:
            ids = torch.where(ids == sep, torch.zeros_like(ids), ids)
        return ids.long()

    def _clips(self, cleaned: list[str], length: int) -> torch.Tensor:
        """open_clip's ``clips`` mode: BOS, text cut to ``length - 3``, EOS, pads, class token last."""
        tok = self.tokenizer
        bos, eos, cls, pad = tok.bos_token_id, tok.eos_token_id, tok.cls_token_id, tok.pad_token_id
        if None in (bos, eos, cls, pad):
            raise ConfigError(
                f"tokenizer {self.name!r}: tokenizer_mode 'clips' needs BOS, EOS, CLS and pad tokens "
                f"(it has bos={bos}, eos={eos}, cls={cls}, pad={pad})"
            )
        rows = tok(cleaned, add_special_tokens=False, padding=False, truncation=False).input_ids
        out = torch.zeros(len(rows), length, dtype=torch.long)
        for i, body in enumerate(rows):
            row = ([bos, *body[: length - 3], eos])[: length - 1]
            row += [pad] * (length - 1 - len(row)) + [cls]
            out[i] = torch.tensor(row, dtype=torch.long)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of one cleaned text without special tokens (nor padding or truncation)."""
        return list(self.tokenizer(self._cleaned(text)[0], add_special_tokens=False).input_ids)

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one row of ids; with ``skip_special_tokens`` pads, BOS/EOS and separators go."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        id_list = [int(i) for i in ids]
        bad = [i for i in id_list if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.tokenizer.decode(id_list, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, rows: torch.Tensor | Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        """``decode`` applied to each row of a 2-D batch."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

"""Caption generation for CoCa: greedy, beam search, and top-k / top-p sampling.

The arguments, their defaults and the token sequences are open_clip's ``CoCa.generate`` (which
drives Hugging Face's logits processors and ``BeamSearchScorer``), so captions match open_clip's
token for token. Conventions worth knowing, all inherited from there:

- sequences start with SOT; ``seq_len`` counts it, ``min_seq_len`` too (EOT is forbidden while
  the sequence is shorter than ``min_seq_len``);
- sampling: the repetition penalty and the top-k/top-p filter act on the raw logits and the
  temperature divides the filtered ones; the last position is always EOT; a row ends at EOT or
  at the pad id (0, which is also the BPE id of "!"), later positions hold the pad id;
- beam search: beam scores are sums of *processed raw logits* (not log-probabilities; set
  ``log_probs=True`` for Hugging Face's usual log-softmax scores), hypotheses are ranked by
  ``score / length ** length_penalty`` and ``early_stopping`` is HF's (False: heuristic, True:
  stop at ``num_beams`` finished hypotheses, "never": exhaustive). ``num_beam_groups`` splits the
  beams into groups as open_clip does; without a diversity penalty every group searches the same
  beams, so the result is that of ``num_beams // num_beam_groups`` beams, computed once here.

``generation_type="greedy"`` (not in open_clip) takes the arg-max, which is what open_clip's
``top_k`` with ``top_k=1`` samples. With ``use_cache`` (default) each step runs one position
through the towers (:class:`~clipforge.model.coca.DecodeState`); ``use_cache=False`` re-runs the
whole prefix as open_clip does, which gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.errors import ConfigError

GENERATION_TYPES = ("beam_search", "greedy", "top_k", "top_p")
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407


@dataclass
class GenerationConfig:
    """Every knob of :func:`generate` (open_clip's names and defaults, plus the beam-search ones HF has)."""

    seq_len: int = 30
    min_seq_len: int = 5
    generation_type: str = "beam_search"
    temperature: float = 1.0
    top_p: float = 0.1
    top_k: int = 1
    repetition_penalty: float = 1.0
    num_beams: int = 6
    num_beam_groups: int = 3
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    log_probs: bool = False
    fixed_output_length: bool = False
    use_cache: bool = True
    sot_token_id: int = SOT_TOKEN_ID
    eos_token_id: int = EOT_TOKEN_ID
    pad_token_id: int = 0

    def validate(self, context_length: int) -> None:
        if self.generation_type not in GENERATION_TYPES:
            raise ConfigError(
                f"generation_type must be one of {GENERATION_TYPES}, got {self.generation_type!r}"
            )
        if self.seq_len <= self.min_seq_len:
            raise ConfigError(
                f"seq_len ({self.seq_len}) must be larger than min_seq_len ({self.min_seq_len})"
            )
        if self.seq_len > context_length:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the model's context length {context_length}")
        if self.generation_type == "beam_search" and (
            self.num_beams < 2 or self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups
        ):
            raise ConfigError(
                f"beam search needs num_beams >= 2 divisible by num_beam_groups, got {self.num_beams} "
                f"and {self.num_beam_groups}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")


# --- stepping the model -------------------------------------------------------------------------
class _Stepper:
    """Next-token logits for the current sequences, with or without the KV cache."""

    def __init__(self, model: torch.nn.Module, image_tokens: Tensor, use_cache: bool) -> None:
        self.model = model
        self.image_tokens = image_tokens
        self.state = model.start_decoding(image_tokens) if use_cache else None

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.state is None:
            return self.model.caption_logits(self.image_tokens, tokens)[:, -1].float()
        logits = None
        while self.state.length < tokens.shape[1]:
            logits, self.state = self.model.decode_step(self.state, tokens[:, self.state.length])
        return logits.float()

    def select(self, rows: Tensor) -> None:
        if self.state is None:
            self.image_tokens = self.image_tokens.index_select(0, rows)
        else:
            self.state = self.state.select(rows)


def process_logits(logits: Tensor, tokens: Tensor, cfg: GenerationConfig) -> Tensor:
    """HF's MinLength then RepetitionPenalty processors (open_clip's list), on a copy."""
    scores = logits.clone()
    if tokens.shape[1] < cfg.min_seq_len:
        scores[:, cfg.eos_token_id] = -math.inf
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, tokens)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores.scatter_(1, tokens, seen)
    return scores


def filter_logits(scores: Tensor, cfg: GenerationConfig) -> Tensor:
    """Top-k (ties at the k-th value kept) or top-p (smallest set above ``top_p`` mass) filtering."""
    if cfg.generation_type in ("top_k", "greedy"):
        k = 1 if cfg.generation_type == "greedy" else min(max(cfg.top_k, 1), scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, -math.inf)
    ordered, order = torch.sort(scores, descending=False)
    remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - cfg.top_p)
    remove[..., -1:] = False  # keep at least the most likely token
    return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


# --- sampling and greedy --------------------------------------------------------------------------
def _sample(
    stepper: _Stepper, start: Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> Tensor:
    """open_clip's sampling loop: rows stop at EOT or pad; the last position is forced to EOT."""
    out = start
    while True:
        finished = (out[:, -1] == cfg.eos_token_id) | (out[:, -1] == cfg.pad_token_id)
        if finished.all() and not cfg.fixed_output_length:
            break
        logits = stepper(out)
        sample = torch.full((out.shape[0], 1), cfg.pad_token_id, dtype=out.dtype, device=out.device)
        live = ~finished
        if live.any():
            if out.shape[1] + 1 == cfg.seq_len:
                sample[live] = cfg.eos_token_id
            else:
                scores = filter_logits(process_logits(logits[live], out[live], cfg), cfg)
                sample[live] = _pick(scores / cfg.temperature, cfg, generator)
        out = torch.cat([out, sample], dim=1)
        if out.shape[1] >= cfg.seq_len:
            break
    return out


def _pick(scores: Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> Tensor:
    if cfg.generation_type == "greedy":
        return scores.argmax(dim=-1, keepdim=True)
    return torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)


# --- beam search ----------------------------------------------------------------------------------
@dataclass
class _Hypotheses:
    """The ``num_beams`` best finished hypotheses of one image (HF's ``BeamHypotheses`` rules)."""

    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    max_length: int
    beams: list[tuple[float, Tensor]] = field(default_factory=list)
    worst_score: float = 1e9

    def add(self, tokens: Tensor, score_sum: float, length: int) -> None:
        score = score_sum / (length**self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_score_sum: float, length: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_length
        return self.worst_score >= best_score_sum / length**self.length_penalty

    def best(self) -> Tensor:
        # Stable sort, then the last of the top scores: HF's choice among equal scores.
        return sorted(self.beams, key=lambda b: b[0])[-1][1]


def _beam_step(
    scores: Tensor, tokens: Tensor, hyps: list[_Hypotheses], done: list[bool], cfg: GenerationConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Choose each image's next beams from its ``2 * beams`` best candidates; finished ones become hypotheses."""
    batch, width = len(hyps), hyps[0].num_beams
    vocab = scores.shape[-1]
    top_scores, top_ids = torch.topk(scores.view(batch, width * vocab), 2 * width, dim=1)
    next_scores = torch.zeros(batch, width, dtype=scores.dtype)
    next_tokens = torch.full((batch, width), cfg.pad_token_id, dtype=torch.long)
    next_rows = torch.arange(batch).repeat_interleave(width) * width
    length = tokens.shape[1] + 1
    candidates = zip(top_scores.tolist(), (top_ids // vocab).tolist(), (top_ids % vocab).tolist())
    for b, (b_scores, b_beams, b_tokens) in enumerate(candidates):
        if done[b]:
            continue
        kept = 0
        for rank, (score, beam, token) in enumerate(zip(b_scores, b_beams, b_tokens)):
            row = b * width + beam
            if token == cfg.eos_token_id:
                if rank < width:
                    hyps[b].add(tokens[row].clone(), score, length)
            else:
                next_scores[b, kept], next_tokens[b, kept] = score, token
                next_rows[b * width + kept] = row
                kept += 1
            if kept == width:
                break
        done[b] = hyps[b].is_done(b_scores[0], length)
    return next_scores.view(-1), next_tokens.view(-1), next_rows


def _beam_search(stepper: _Stepper, batch: int, cfg: GenerationConfig, device: torch.device) -> Tensor:
    width = cfg.num_beams // cfg.num_beam_groups
    tokens = torch.full((batch * width, 1), cfg.sot_token_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(batch, width, device=device)
    beam_scores[:, 1:] = -1e9  # one live beam per image at first, so beams do not start identical
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(width, cfg.length_penalty, cfg.early_stopping, cfg.seq_len) for _ in range(batch)]
    done = [False] * batch
    while True:
        logits = stepper(tokens)
        scores = process_logits(logits.log_softmax(dim=-1) if cfg.log_probs else logits, tokens, cfg)
        next_scores, next_tokens, rows = _beam_step(scores + beam_scores[:, None], tokens, hyps, done, cfg)
        rows = rows.to(device)
        tokens = torch.cat([tokens.index_select(0, rows), next_tokens.to(device)[:, None]], dim=1)
        stepper.select(rows)
        beam_scores = next_scores.to(device)
        if all(done) or tokens.shape[1] >= cfg.seq_len:
            break
    for b, hyp in enumerate(hyps):
        if not done[b]:
            for k in range(width):
                hyp.add(tokens[b * width + k], float(beam_scores[b * width + k]), tokens.shape[1])
    return _pack([hyp.best() for hyp in hyps], cfg, device)


def _pack(best: list[Tensor], cfg: GenerationConfig, device: torch.device) -> Tensor:
    """Rows padded to the longest (+1 for EOT, at most ``seq_len``); EOT appended where it fits."""
    lengths = [len(seq) for seq in best]
    width = min(max(lengths) + 1, cfg.seq_len)
    out = torch.full((len(best), width), cfg.pad_token_id, dtype=torch.long, device=device)
    for i, seq in enumerate(best):
        out[i, : len(seq)] = seq
        if len(seq) < width:
            out[i, len(seq)] = cfg.eos_token_id
    return out


# --- entry point ----------------------------------------------------------------------------------
def generate(
    model: torch.nn.Module,
    images: Tensor,
    text: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    **options: object,
) -> Tensor:
    """Caption token ids ``[B, T]`` for a batch of preprocessed images (see the module docstring).

    ``options`` are :class:`GenerationConfig`'s fields (open_clip's ``generate`` keywords:
    ``seq_len``, ``min_seq_len``, ``generation_type``, ``num_beams``, ...). ``text`` is an optional
    prompt ``[B, P]`` or ``[P]`` that sampling continues (beam search always starts at SOT).
    ``generator`` seeds top-k/top-p sampling.
    """
    unknown = sorted(set(options) - set(GenerationConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"unknown generate option(s) {unknown}; known: {sorted(GenerationConfig.__dataclass_fields__)}"
        )
    cfg = GenerationConfig(**options)  # type: ignore[arg-type]
    cfg.validate(min(model.text.context_length, model.text_decoder.context_length))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _run(model, images, text, cfg, generator)
    finally:
        model.train(was_training)


def _run(
    model: torch.nn.Module, images: Tensor, text: Tensor | None, cfg: GenerationConfig, generator
) -> Tensor:
    device = images.device
    if cfg.generation_type == "beam_search":
        width = cfg.num_beams // cfg.num_beam_groups
        _, image_tokens = model.encode_image_tokens(images)
        stepper = _Stepper(model, image_tokens.repeat_interleave(width, dim=0), cfg.use_cache)
        return _fixed_length(_beam_search(stepper, images.shape[0], cfg, device), cfg)
    _, image_tokens = model.encode_image_tokens(images)
    squeeze = text is not None and text.dim() == 1
    if text is None:
        text = torch.full((images.shape[0], 1), cfg.sot_token_id, dtype=torch.long, device=device)
    start = text[None] if squeeze else text
    out = _sample(_Stepper(model, image_tokens, cfg.use_cache), start.to(device), cfg, generator)
    return out[0] if squeeze else out


def _fixed_length(out: Tensor, cfg: GenerationConfig) -> Tensor:
    if not cfg.fixed_output_length or out.shape[1] >= cfg.seq_len:
        return out
    pad = torch.full(
        (out.shape[0], cfg.seq_len - out.shape[1]), cfg.pad_token_id, dtype=out.dtype, device=out.device
    )
    return torch.cat([out, pad], dim=1)


def captions_from_ids(tokenizer: object, ids: Tensor, pad_token_id: int = 0) -> list[str]:
    """Text of generated rows: up to the first EOT, trailing pad ids (rows that ended early) dropped."""
    eot = getattr(tokenizer, "eot_token_id", EOT_TOKEN_ID)
    texts = []
    for row in ids.tolist():
        row = row[: row.index(eot)] if eot in row else row
        while len(row) > 1 and row[-1] == pad_token_id:
            row.pop()
        texts.append(tokenizer.decode(row))
    return texts

"""Where training numbers go: a JSONL file (always), TensorBoard (optional), a tqdm bar (rank 0).

The JSONL log is the durable record: one object per line, appended and flushed, so a killed run
keeps everything up to its last line. On resume, lines past the resumed step are dropped first so
the log reads as one uninterrupted run.

The logger also meters throughput: :meth:`RunLogger.step` reports each optimiser step (progress
bar, and a metrics line every ``log_every`` steps with the samples/s since the previous line), and
:meth:`RunLogger.samples_per_second` gives the whole run's rate for the summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from clipforge.atomic import atomic_write_text

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        progress: bool = True,
        total_steps: int = 0,
        initial_step: int = 0,
        log_every: int = 1,
        initial_samples: int = 0,
    ) -> None:
        self.enabled = enabled
        self.total_steps, self.log_every = total_steps, log_every
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            self._start = self._window = (time.perf_counter(), initial_samples)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(initial_step)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; logging to %s only", self.path)
            else:
                self._tb = SummaryWriter(
                    str(Path(output_dir) / "tensorboard"), purge_step=initial_step or None
                )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True
            )
        self._start = self._window = (time.perf_counter(), initial_samples)  # after the slow setup

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill: drop it
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def step(self, step: int, samples_seen: int, metrics: dict[str, Any] | None, epoch: int) -> None:
        """Report one optimiser step (``metrics`` None: it was skipped); a metrics line every
        ``log_every`` steps and at the last, with the samples/s since the previous line."""
        now = time.perf_counter()
        since, samples = self._window
        sps = (samples_seen - samples) / max(now - since, 1e-9)
        if metrics is None:
            self.progress(1)
            return
        self.progress(1, loss=f"{metrics['loss']:.4f}", sps=f"{sps:.1f}", lr=f"{metrics['lr']:.2e}")
        if step % self.log_every == 0 or step == self.total_steps:
            self.log(step, {**metrics, "epoch": epoch, "samples_per_s": sps})
            self._window = (now, samples_seen)

    def samples_per_second(self, samples_seen: int) -> tuple[float, float]:
        """``(samples/s, seconds)`` since this logger was opened: the run's (or resumed part's) rate."""
        start, samples = self._start
        wall = time.perf_counter() - start
        return (samples_seen - samples) / max(wall, 1e-9), wall

    def evaluation(self, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        """An ``eval`` metrics line and a one-line summary of the headline numbers."""
        self.log(step, {**metrics, "epoch": epoch}, kind="eval")
        shown = {
            k: metrics[k]
            for k in ("image_retrieval_recall@1", "text_retrieval_recall@1", "zeroshot_acc1")
            if k in metrics
        }
        self.write(f"eval @ epoch {epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))

    def progress(self, steps: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar (rank 0 only)."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            log.info(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._fh.close()

"""``clipforge doctor``: scan a dataset and report what training would skip, and why.

It runs the same checks the datasets run while training (table parsing, caption cleaning,
path containment, full image decoding), but over every item and without stopping, and
collects counts by reason plus the first offending rows. Nothing is modified.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from clipforge.data.images import BadImageError

logger = logging.getLogger(__name__)

# Row-level problems that are repaired (the row is kept) rather than skipped.
REPAIRED = ("non_utf8", "nul", "duplicate_rows")


@dataclass
class DoctorReport:
    source: str
    kind: str
    items: int = 0  # rows/samples looked at
    usable: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_skipped": self.total_skipped}

    def format(self) -> str:
        lines = [
            f"{self.source} ({self.kind})",
            f"  items: {self.items}   usable: {self.usable}   would skip: {self.total_skipped}",
        ]
        if self.skipped:
            lines.append("  skipped by reason:")
            for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {reason:<15} {n:>7}")
                lines += [f"        {e}" for e in self.examples.get(reason, [])]
        if self.repaired:
            lines.append(
                "  repaired, kept: " + ", ".join(f"{k}={v}" for k, v in sorted(self.repaired.items()))
            )
        if not self.skipped and not self.repaired:
            lines.append("  no problems found")
        return "\n".join(lines)


def _add(report: DoctorReport, counts: Counter, reason: str, example: str, max_examples: int) -> None:
    counts[reason] += 1
    ex = report.examples.setdefault(reason, [])
    if len(ex) < max_examples:
        ex.append(example)


def scan_dataset(
    spec: str,
    *,
    max_examples: int = 10,
    check_images: bool = True,
    progress: bool = False,
    **dataset_kw: Any,
) -> DoctorReport:
    """Scan ``spec`` (anything :func:`clipforge.data.build_dataset` accepts, except mixes).

    Table-level errors that make the data unusable (missing table or column) still raise
    :class:`~clipforge.errors.DataError`; malformed JSONL lines are counted, not raised.
    """
    from clipforge.data.build import build_dataset
    from clipforge.data.sources import source_kind

    kind = source_kind(spec)
    if kind in ("table", "tables"):
        dataset_kw.setdefault("strict", False)
    if kind == "shards":
        dataset_kw.update(shuffle=False, equalize=False, rank=0, world_size=1)
    ds = build_dataset(spec, **dataset_kw)
    report = DoctorReport(source=spec, kind=kind)
    counts: Counter[str] = Counter()
    if kind == "shards":
        _scan_shards(ds, report, counts, max_examples, check_images, progress)
    else:
        _scan_pairs(ds, report, counts, max_examples, check_images, progress)
    report.skipped = dict(counts)
    return report


def _progress(it: Any, total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="img")


def _scan_pairs(
    ds: Any, report: DoctorReport, counts: Counter, max_examples: int, check: bool, progress: bool
) -> None:
    stats = getattr(ds, "stats", Counter())
    for reason, where, detail in getattr(ds, "issues", []):
        if reason not in REPAIRED:  # counts come from stats below; keep the examples
            ex = report.examples.setdefault(reason, [])
            if len(ex) < max_examples:
                ex.append(f"{where}: {detail}" if detail else where)
    for reason, n in stats.items():
        if reason in REPAIRED:
            report.repaired[reason] = n
        else:
            counts[reason] += n
    table_skips = sum(n for r, n in stats.items() if r not in REPAIRED)
    report.items = len(ds) + table_skips
    usable = len(ds)
    if check and hasattr(ds, "image_paths"):
        for i in _progress(range(len(ds)), len(ds), progress, "checking images"):
            try:
                ds.get_image(i)
            except BadImageError as e:
                usable -= 1
                _add(report, counts, e.reason, f"{ds.rows[i]}: {e}", max_examples)
    report.usable = usable


def _scan_shards(
    ds: Any, report: DoctorReport, counts: Counter, max_examples: int, check: bool, progress: bool
) -> None:
    refs = list(ds.ref_stream(0, 1))
    report.items = len(refs)
    usable = 0
    for s, j in _progress(refs, len(refs), progress, "checking samples"):
        try:
            if check:
                ds.load_sample(s, j)
            usable += 1
        except BadImageError as e:
            _add(report, counts, e.reason, str(e), max_examples)
    report.usable = usable
    ds.close()

"""Evaluation results: one JSON per run, and tables merged from many runs.

The JSON uses CLIP_benchmark's field names (``dataset``, ``model``, ``pretrained``, ``task``,
``metrics``, ``language``) so existing tooling and spreadsheets built around CLIP_benchmark read
ours unchanged. ``metrics`` holds scalars only (they become CSV columns); lists such as per-class
accuracy and the confusion matrix live under ``details``. Extra top-level fields: ``timings``
(seconds), ``versions``, ``config`` (templates, batch size, device...), ``created`` (UTC ISO).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipforge.errors import ClipforgeError
from clipforge.text_table import format_columns

# our task names on the CLI -> CLIP_benchmark's names in the JSON
TASK_NAMES = {
    "zeroshot": "zeroshot_classification",
    "zeroshot_classification": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "zeroshot_retrieval": "zeroshot_retrieval",
    "linear-probe": "linear_probe",
    "linear_probe": "linear_probe",
    "captioning": "captioning",
}
FIRST_COLUMNS = ("model", "pretrained", "model_fullname", "dataset", "task", "language")


def benchmark_task(task: str) -> str:
    try:
        return TASK_NAMES[task]
    except KeyError:
        raise ClipforgeError(
            f"unknown task {task!r}; use zeroshot, retrieval, linear-probe or captioning"
        ) from None


def versions() -> dict[str, str]:
    import torch

    import clipforge

    return {
        "clipforge": clipforge.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(terse=True),
    }


def make_result(
    *,
    dataset: str,
    model: str,
    pretrained: str | None,
    task: str,
    metrics: Mapping[str, Any],
    details: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
    model_config: Mapping[str, Any] | None = None,
    language: str = "en",
) -> dict[str, Any]:
    """Assemble one run's record; non-scalar metric values are moved to ``details``."""
    scalars, extra = {}, dict(details or {})
    for key, value in metrics.items():
        if isinstance(value, bool | int | float) or value is None:
            scalars[key] = value
        else:
            extra[key] = value
    return {
        "dataset": dataset,
        "model": model,  # a registered name only when the config is exactly that architecture
        **({"model_config": dict(model_config)} if model_config else {}),
        "pretrained": pretrained or "",
        "task": benchmark_task(task),
        "metrics": scalars,
        "language": language,
        "details": extra,
        "timings": {k: round(float(v), 4) for k, v in (timings or {}).items()},
        "config": dict(config or {}),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON; write them as null rather than emit a file other tools reject."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # tensors / numpy values
        return _json_safe(obj.tolist())
    return obj


def publish(path: Path) -> Path:
    """Atomic writes go through ``mkstemp`` (mode 0600); results and reports are meant to be
    read by others (a web server, a colleague), so give them the usual 0644."""
    try:
        os.chmod(path, 0o644)
    except OSError:  # pragma: no cover - e.g. a filesystem without permissions
        pass
    return path


def write_result(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same folder, then rename)."""
    from clipforge.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    return publish(path)


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ClipforgeError(f"cannot read results file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ClipforgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(data, dict) or "metrics" not in data or not isinstance(data["metrics"], dict):
        raise ClipforgeError(f"{path}: not an evaluation result (no 'metrics' object)")
    return data


def merge_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """One flat row per result file: metrics as columns (CLIP_benchmark's ``build`` layout),
    plus ``model_fullname`` = "model pretrained" and ``file``."""
    rows = []
    for path in paths:
        data = read_result(path)
        row: dict[str, Any] = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
        row.update(data["metrics"])
        row["model_fullname"] = f"{data.get('model', '')} {data.get('pretrained', '')}".strip()
        if "total" in data.get("timings", {}):
            row["seconds"] = data["timings"]["total"]
        row["file"] = str(path)
        rows.append(row)
    if not rows:
        raise ClipforgeError("merge: no result files given")
    return rows


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Identity columns first, then metrics in first-seen order: stable, readable CSVs."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key)
    first = [c for c in FIRST_COLUMNS if c in seen]
    return first + [c for c in seen if c not in first]


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Union of all columns; missing values are empty cells. Written atomically."""
    from clipforge.atomic import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=table_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return publish(path)


HEADLINE = ("acc1", "acc5", "mean_per_class_recall", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def _headline_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Identity columns plus the metrics people compare; the CSV keeps everything."""
    present = table_columns(rows)
    recall = [c for c in present if re.fullmatch(r"(image|text)_retrieval_recall@\d+", c)]
    return [c for c in ("model", "pretrained", "dataset", "task") if c in present] + [
        c for c in present if c in HEADLINE or c in recall
    ]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table for the terminal (headline metrics by default)."""
    columns = list(columns or _headline_columns(rows))
    header = [
        c.replace("_retrieval_recall@", " R@").replace("mean_per_class_recall", "mean_recall")
        for c in columns
    ]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    return format_columns(header, [[fmt(r.get(c)) for c in columns] for r in rows], rule=True)

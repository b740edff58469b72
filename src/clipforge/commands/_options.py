"""Options shared by several commands, defined once (table-reading flags first).

open_clip's spellings (``--csv-separator``, ``--csv-img-key``, ``--csv-caption-key``) are the
names; ``--image-key``/``--caption-key`` stay as aliases. Every command turns them into one
:class:`~clipforge.data.tables.TableOptions`, so a table means the same thing everywhere.
"""

from __future__ import annotations

import argparse

from clipforge.data.tables import TableOptions, parse_separator


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tables (CSV/TSV/JSON/JSONL/parquet; the same flags for every command)")
    g.add_argument(
        "--csv-separator",
        default=None,
        metavar="SEP",
        help="field separator: ',' or '\\t' / 'tab' (default: sniffed from the header)",
    )
    g.add_argument(
        "--csv-img-key",
        "--image-key",
        dest="image_key",
        default=None,
        metavar="COLUMN",
        help="image path (or bytes) column (default: image, filepath, path, ... auto-detected)",
    )
    g.add_argument(
        "--csv-caption-key",
        "--caption-key",
        dest="caption_key",
        default=None,
        metavar="COLUMNS",
        help="caption column(s), comma-separated (default: caption, title, text, ... auto-detected)",
    )
    g.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="folder relative image paths start from (default: the table's folder)",
    )
    g.add_argument(
        "--confine-paths",
        action="store_true",
        help="skip rows whose image path resolves outside the data root (counted as path_escape)",
    )


def table_options(args: argparse.Namespace) -> TableOptions:
    """The :class:`TableOptions` the flags describe (validated: a bad separator exits early)."""
    return TableOptions(
        separator=parse_separator(getattr(args, "csv_separator", None)),
        image_key=getattr(args, "image_key", None),
        caption_key=getattr(args, "caption_key", None),
        data_root=getattr(args, "data_root", None),
        confine=bool(getattr(args, "confine_paths", False)),
    )


def table_kwargs(args: argparse.Namespace) -> dict:
    """The same options as keywords for ``build_dataset``/``scan_dataset`` (unset ones left out)."""
    opts = table_options(args)
    kw = {k: getattr(opts, k) for k in ("separator", "image_key", "caption_key", "data_root")}
    kw["confine"] = opts.confine or None
    return {k: v for k, v in kw.items() if v is not None}

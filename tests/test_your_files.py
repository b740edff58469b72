"""Users' files as they are: one table reader and one spec grammar behind every command.

Real Adwaita icons (PNG with alpha, named by concept) written into the tables users bring:
absolute paths, open_clip's tab-separated ``.csv`` (``filepath``/``title``), ``~`` paths,
parquet with paths and parquet with the image bytes inside (Hugging Face's ``{bytes, path}``),
a folder of parquet shards. Each spec goes through train, eval, embed, doctor and shards make,
and must mean the same rows to all of them. open_clip_train's ``CsvDataset`` is the oracle
for its own CSV convention.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import realdata
import torch

from clipforge.cli import main
from clipforge.data import build_dataset
from clipforge.data.doctor import scan_dataset
from clipforge.data.pairs import PairsDataset
from clipforge.data.sources import expand_braces, source_kind, table_files
from clipforge.data.tables import TableOptions, read_table, sniff_separator
from clipforge.errors import DataError

N = 12


@pytest.fixture(scope="module")
def icons() -> list[Path]:
    found = realdata.icons("48x48")
    step = max(1, len(found) // N)
    return found[::step][:N]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _parquet(path: Path, icons: list[Path], *, embed: bool, row_group_size: int = 5) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if embed:
        image = [{"bytes": p.read_bytes(), "path": p.name} for p in icons]
    else:
        image = [str(p) for p in icons]
    table = pa.table({"image": image, "text": [realdata.concept(p) for p in icons]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def specs(icons, tmp_path_factory) -> dict[str, str]:
    """The same icons and captions in every layout a user might bring."""
    root = tmp_path_factory.mktemp("tables")
    caps = [realdata.concept(p) for p in icons]
    out = {
        "absolute_csv": _write(
            root / "abs.csv", "image,caption\n" + "".join(f"{p},{c}\n" for p, c in zip(icons, caps))
        ),
        "open_clip_tab_csv": _write(
            root / "oc" / "train.csv",
            "filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in zip(icons, caps)),
        ),
        "jsonl": _write(
            root / "p.json",
            "".join(json.dumps({"file": str(p), "text": c}) + "\n" for p, c in zip(icons, caps)),
        ),
        "parquet_paths": _parquet(root / "paths.parquet", icons, embed=False),
        "parquet_bytes": _parquet(root / "bytes.parquet", icons, embed=True),
    }
    shards = root / "hf"
    _parquet(shards / "train-00000-of-00002.parquet", icons[:7], embed=True)
    _parquet(shards / "train-00001-of-00002.parquet", icons[7:], embed=True)
    out["parquet_folder"] = shards
    out["parquet_pattern"] = shards / "train-{00000..00001}-of-00002.parquet"
    folder = root / "folder"
    for i, (p, c) in enumerate(zip(icons, caps)):
        _write(folder / f"{i:02d}-{p.name}", "").write_bytes(p.read_bytes())
        _write(folder / f"{i:02d}-{p.stem}.txt", c + "\n")
    out["folder"] = folder
    from clipforge.data.shards import write_shards

    write_shards(str(out["open_clip_tab_csv"]), root / "wds", max_count=5, prefix="s")
    out["shards"] = root / "wds" / "s-{000000..000002}.tar"
    return {k: str(v) for k, v in out.items()}


LAYOUTS = [
    "absolute_csv",
    "open_clip_tab_csv",
    "jsonl",
    "parquet_paths",
    "parquet_bytes",
    "parquet_folder",
    "parquet_pattern",
    "folder",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_the_same_rows(specs, icons, layout):
    ds = build_dataset(specs[layout])
    assert len(ds) == N
    assert [c[0] for c in ds.all_captions] == [realdata.concept(p) for p in icons]
    for i in (0, N - 1):
        with ds.get_image(i) as got, __import__("PIL.Image").Image.open(icons[i]) as want:
            assert got.size == want.size


@pytest.mark.parametrize(
    "layout", ["open_clip_tab_csv", "parquet_bytes", "parquet_folder", "folder", "shards"]
)
def test_every_command_accepts_the_spec(specs, layout, tmp_path, capsys):
    spec = specs[layout]
    rep = scan_dataset(spec)
    assert (rep.items, rep.usable, rep.total_skipped) == (N, N, 0)

    assert main(["embed", "--model", "tiny-vit", "--images", spec, "--out", str(tmp_path / "emb"),
                 "--workers", "0", "--batch-size", "5"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "emb" / "embed_manifest.json").read_text())
    assert (manifest["count"], manifest["skipped"]) == (N, 0)

    out = tmp_path / "ret.json"
    assert main(["eval", "--model", "tiny-vit", "--task", "retrieval", "--data", spec, "--output", str(out),
                 "--no-progress", "--recall-k", "1"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["metrics"]["num_images"] == N

    if layout != "shards":
        assert main(["shards", "make", spec, "--out", str(tmp_path / "sh"), "--max-count", "5"]) == 0
        assert json.loads((tmp_path / "sh" / "manifest.json").read_text())["total"] == N

    threads = torch.get_num_threads()
    try:
        assert main(["train", "--data", spec, "--model", "tiny-vit", "--batch-size", "4", "--max-steps", "2",
                     "--threads", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_open_clip_csv_matches_open_clip_train(specs, icons):
    """open_clip's own reader (pandas, sep='\\t') and ours agree on paths and tokens, no flag given."""
    data = pytest.importorskip("open_clip_train.data")
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    theirs = data.CsvDataset(
        specs["open_clip_tab_csv"], lambda im: 0, "filepath", "title", sep="\t", tokenizer=tok
    )
    ours = PairsDataset(specs["open_clip_tab_csv"], tokenizer=tok)
    assert ours.image_paths == [str(p) for p in theirs.images]
    assert [c[0] for c in ours.all_captions] == list(theirs.captions)
    for i in range(N):
        assert torch.equal(ours[i][1], theirs[i][1])
    explicit = PairsDataset(
        specs["open_clip_tab_csv"], separator="\t", image_key="filepath", caption_key="title"
    )
    assert explicit.image_paths == ours.image_paths


def test_csv_separator_flag_and_sniffing(tmp_path, icons):
    assert sniff_separator("filepath\ttitle", "csv") == "\t"
    assert sniff_separator("image;caption", "csv") == ";"
    assert sniff_separator("image,caption", "csv") == ","
    assert sniff_separator("image", "csv") == ","
    t = _write(tmp_path / "semi.csv", f"image;caption\n{icons[0]};a, b and c\n")
    assert PairsDataset(t).all_captions == [["a, b and c"]]
    assert PairsDataset(t, separator=";").all_captions == [["a, b and c"]]
    with pytest.raises(DataError, match="no image column found.*columns present"):
        PairsDataset(t, separator=",")  # the header is one column 'image;caption'
    assert main(["doctor", str(t), "--csv-separator", "tab", "--no-images"]) == 2


def test_paths_absolute_home_and_relative(tmp_path, icons, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(icons[0].read_bytes())
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "b.png").write_bytes(icons[1].read_bytes())
    t = _write(
        tmp_path / "data" / "t.csv",
        f"image,caption\n~/pics/a.png,home\nimg/b.png,relative\n{icons[2]},absolute\n../pics/a.png,parent\n",
    )
    ds = PairsDataset(t)
    assert ds.image_paths == [
        str(tmp_path / "pics" / "a.png"),
        str(tmp_path / "data" / "img" / "b.png"),
        str(icons[2]),
        str(tmp_path / "pics" / "a.png"),
    ]
    assert all(ds.get_image(i).size == (48, 48) for i in range(4))
    confined = PairsDataset(t, confine=True, strict=False)
    assert confined.image_paths == [str(tmp_path / "data" / "img" / "b.png")]
    assert confined.stats["path_escape"] == 3
    rooted = PairsDataset(_write(tmp_path / "elsewhere" / "t.csv", "image,caption\nimg/b.png,x\n"),
                          data_root=tmp_path / "data")  # fmt: skip
    assert rooted.image_paths == [str(tmp_path / "data" / "img" / "b.png")]


def test_all_rows_skipped_says_why(tmp_path):
    t = _write(tmp_path / "t.csv", "image,caption\n/x/a.png,\n,cap\n/x/b.png,\n")
    with pytest.raises(DataError, match=r"no usable rows \(empty_caption=2, missing_field=1\)"):
        PairsDataset(t)
    rc = main(["train", "--data", str(t), "--model", "tiny-vit", "--max-steps", "1", "--no-progress",
               "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert rc == 2


def test_json_array_and_json_lines_mean_the_same(tmp_path, icons):
    rows = [{"image": str(p), "caption": realdata.concept(p)} for p in icons[:3]]
    array = _write(tmp_path / "a.json", json.dumps(rows))
    lines = _write(tmp_path / "l.json", "\n".join(json.dumps(r) for r in rows))
    assert PairsDataset(array).image_paths == PairsDataset(lines).image_paths == [str(p) for p in icons[:3]]


def test_brace_patterns_follow_braceexpand():
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("{a..c}") == ["a", "b", "c"]
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]


def test_spec_kinds(specs, tmp_path):
    assert source_kind(specs["parquet_folder"]) == "tables"
    assert source_kind(specs["parquet_pattern"]) == "tables"
    assert source_kind(specs["open_clip_tab_csv"]) == "table"
    assert source_kind("synthetic:shapes?n=4") == "synthetic"
    assert source_kind("cifar10:/nowhere") == "torchvision"
    assert len(table_files(specs["parquet_folder"])) == 2
    with pytest.raises(DataError, match="data not found"):
        source_kind(str(tmp_path / "nope"))


def test_parquet_reads_row_groups_on_demand_and_shuffles_by_group(specs):
    """Embedded bytes are read a row group at a time (cache bounded), and the loader's shuffle
    visits rows group by group so each row group is decoded once per epoch."""
    from clipforge.data.loader import ResumableLoader
    from clipforge.data.parquet import CACHED_ROW_GROUPS

    ds = PairsDataset(specs["parquet_bytes"])
    assert ds.locality_blocks() == [5, 5, 2]
    reader = ds.embedded.files[0]
    reads = []
    original = reader._open().read_row_group

    def counting(g, **kw):
        reads.append(g)
        return original(g, **kw)

    reader._file.read_row_group = counting
    loader = ResumableLoader(ds, batch_size=1, shuffle=True, drop_last=False, seed=3, rank=0, world_size=1)
    order = loader._sampler(0).indices()
    assert sorted(order) == list(range(N)) and order != list(range(N))
    for i in order:
        ds.get_image(i)
    assert sorted(reads) == [0, 1, 2] and len(reader._cache) <= CACHED_ROW_GROUPS


def test_image_column_of_wrong_type_names_file_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [1, 2], "caption": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: image column 'image' has type int64"):
        read_table(tmp_path / "t.parquet", TableOptions())


def test_search_server_reads_parquet_rows_back(specs, icons, tmp_path):
    from clipforge.data.items import list_items

    items = list_items(specs["parquet_bytes"])
    assert [it.row for it in items] == list(range(N))
    assert items[7].read_bytes() == icons[7].read_bytes()
    assert os.path.samefile(items[0].path, specs["parquet_bytes"])


def test_search_queries_use_the_image_convention_embed_used(icons, tmp_path):
    """``embed --image-alpha composite:#000000`` is recorded; image queries get the same pixels."""
    from PIL import Image

    from clipforge.search.searcher import Searcher

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in icons[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    import clipforge

    emb, idx, weights = tmp_path / "emb", tmp_path / "idx", tmp_path / "model"
    clipforge.save_pretrained(clipforge.create_model("tiny-vit"), weights)
    assert main(["embed", "--pretrained", str(weights), "--images", str(folder), "--out", str(emb),
                 "--workers", "0", "--image-alpha", "composite:#000000"]) == 0  # fmt: skip
    assert json.loads((emb / "embed_manifest.json").read_text())["preprocess"]["alpha"] != "drop"
    assert main(["index", str(emb), "--out", str(idx)]) == 0
    searcher = Searcher(idx)
    searcher.ensure_model()
    stored = __import__("numpy").load(emb / "img_emb_00000.npy").astype("float32")
    with Image.open(sorted(folder.iterdir())[0]) as im:
        query = searcher.encode_images([im.copy()])
    assert abs(float(query[0] @ stored[0]) - 1.0) < 2e-3  # same pixels as when embedded

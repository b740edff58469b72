"""The atomic-write helpers the data, search and export layers share, and the files they write.

Each test checks what is on disk after success and after a failure mid-write: the old content
(or nothing) under the real name, and no temporary file or staging folder left behind.
"""

from __future__ import annotations

import csv
import stat

import pytest
import torch

from clipforge.atomic import atomic_dir, atomic_write, atomic_write_text, replace_file, staging_dir
from clipforge.checkpoints.io import save_safetensors
from clipforge.data.column_tables import iter_table_chunks, read_table, write_table
from clipforge.data.shards import write_shards
from clipforge.data.synthetic import SyntheticShapes, write_synthetic


def test_atomic_dir_replaces_a_folder_only_when_the_block_completes(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("one")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "b.txt").write_text("two")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old folder, untouched
    with atomic_dir(target) as staging:
        (staging / "c.txt").write_text("three")
    assert [p.name for p in target.iterdir()] == ["c.txt"]  # replaced whole, nothing merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no staging folders left


def test_staging_dir_and_replace_file_publish_under_the_final_name(tmp_path):
    with staging_dir(tmp_path, "graph.onnx") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".graph.onnx.")
        (staging / "graph.onnx").write_bytes(b"graph")
        (staging / "left-over").write_bytes(b"x")
        replace_file(staging / "graph.onnx", tmp_path / "graph.onnx")
    assert (tmp_path / "graph.onnx").read_bytes() == b"graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.onnx"]


def test_atomic_write_passes_newline_for_csv(tmp_path):
    with atomic_write(tmp_path / "t.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["a", "b"], ["1", "2"]])
    assert (tmp_path / "t.csv").read_bytes() == b"a,b\r\n1,2\r\n"  # csv's own line ends, untranslated


def test_write_synthetic_table(tmp_path):
    table = write_synthetic(tmp_path, 3, seed=1)
    rows = list(csv.reader(table.open(encoding="utf-8", newline="")))
    assert rows[0] == ["image", "caption"] and len(rows) == 4
    assert [r[0] for r in rows[1:]] == ["images/000000.png", "images/000001.png", "images/000002.png"]
    assert not list(tmp_path.glob(".*"))


def test_write_shards_failure_keeps_only_complete_shards(tmp_path):
    class Failing(SyntheticShapes):
        def get_image(self, i):
            if i == 5:
                raise OSError("disk gone")
            return super().get_image(i)

    with pytest.raises(OSError, match="disk gone"):
        write_shards(Failing(8, image_size=16), tmp_path, max_count=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    res = write_shards(SyntheticShapes(5, image_size=16), tmp_path / "ok", max_count=2)
    assert res.counts == [2, 2, 1] and res.total == 5
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]


def test_metadata_csv_read_whole_and_in_chunks(tmp_path):
    path = write_table(tmp_path / "m.csv", {"id": [0, 1, 2], "path": ["a", "b", "c"]})
    assert read_table(path) == {"id": [0, 1, 2], "path": ["a", "b", "c"]}
    assert list(iter_table_chunks(path, rows=2)) == [
        {"id": [0, 1], "path": ["a", "b"]},
        {"id": [2], "path": ["c"]},
    ]
    empty = write_table(tmp_path / "e.csv", {"id": [], "path": []})
    assert read_table(empty) == {"id": [], "path": []}  # header only: empty columns
    assert list(iter_table_chunks(empty)) == []


def test_atomic_writes_get_the_permissions_a_plain_open_gives(tmp_path):
    # mkstemp/mkdtemp make 0600/0700 entries; a checkpoint or manifest must not end up private.
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    with atomic_dir(tmp_path / "folder") as d:
        (d / "f").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain)
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # recreates its file as 0600
    assert mode(tmp_path / "w.safetensors") == mode(plain)
    assert mode(tmp_path / "folder") == mode(tmp_path / "plain_dir")

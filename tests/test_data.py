"""Pairs tables, image folders, mixing, spec parsing and the resumable loader (map-style)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import build_dataset, build_loader, split_spec
from clipforge.data.images import SkipCounter
from clipforge.data.loader import ResumableLoader
from clipforge.data.mix import MixDataset
from clipforge.data.pairs import FolderPairsDataset, PairsDataset, collate_pairs
from clipforge.data.synthetic import SyntheticShapes
from clipforge.errors import DataError


def tok(text: str) -> torch.Tensor:
    """Stand-in tokenizer: [1, 8] ids from a stable hash of the text."""
    h = zlib.crc32(text.encode())
    return torch.tensor([[49406, h % 1000, len(text), 49407, 0, 0, 0, 0]])


def tf(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float() / 255


def make_images(folder, n, *, bad=()):
    """n small PNGs (colour encodes the index); indices in ``bad`` get broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ["zero", "missing", "corrupt", "text"]
    for i in range(n):
        p = folder / f"{i:04d}.png"
        if i in bad:
            kind = kinds[bad.index(i) % 4]
            if kind == "zero":
                p.write_bytes(b"")
            elif kind == "corrupt":
                p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
            elif kind == "text":
                p.write_bytes(b"<html>not found</html>")
            continue  # "missing": no file at all
        Image.new("RGB", (12, 12), (i % 256, (i * 7) % 256, 3)).save(p)


def write_csv(path, rows, header=("image", "caption")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def table(tmp_path):
    make_images(tmp_path / "img", 20)
    rows = [(f"img/{i:04d}.png", f"caption {i}") for i in range(20)]
    return write_csv(tmp_path / "pairs.csv", rows)


def test_csv_items(table):
    ds = PairsDataset(table, transform=tf, tokenizer=tok)
    assert len(ds) == 20
    img, tokens = ds[3]
    assert img.shape == (3, 8, 8) and tokens.shape == (8,) and tokens.dtype == torch.long
    assert torch.equal(tokens, tok("caption 3")[0])
    assert abs(float(img[0, 0, 0]) - 3 / 255) < 1e-6  # row 3 -> image 3 (relative path resolved)
    assert ds.image_paths[3].endswith("img/0003.png") and ds.all_captions[3] == ["caption 3"]


def test_tsv_and_custom_keys(tmp_path):
    make_images(tmp_path, 3)
    (tmp_path / "t.tsv").write_text("file\tdesc\n0000.png\ta, b\n0001.png\tc\n", encoding="utf-8")
    ds = PairsDataset(tmp_path / "t.tsv", image_key="file", caption_key="desc")
    assert [c for c in ds.all_captions] == [["a, b"], ["c"]]


def test_multi_caption_columns_sampled_with_seed(tmp_path):
    make_images(tmp_path, 1)
    write_csv(tmp_path / "m.csv", [("0000.png", "first", "second", "")], ("image", "c1", "c2", "c3"))
    ds = PairsDataset(tmp_path / "m.csv", caption_key=["c1", "c2", "c3"], seed=0)
    assert ds.all_captions[0] == ["first", "second"]  # the empty column is ignored
    seen = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        seen.append(ds[0][1])
    assert set(seen) == {"first", "second"}
    ds2 = PairsDataset(tmp_path / "m.csv", caption_key="c1,c2,c3", seed=0)
    again = []
    for epoch in range(40):
        ds2.set_epoch(epoch)
        again.append(ds2[0][1])
    assert again == seen  # deterministic by (seed, epoch, index)


def test_jsonl_list_captions(tmp_path):
    make_images(tmp_path, 2)
    lines = [{"image": "0000.png", "captions": ["x", "y", ""]}, {"image": "0001.png", "captions": "z"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    ds = PairsDataset(tmp_path / "p.jsonl")
    assert ds.all_captions == [["x", "y"], ["z"]]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"image": "a.png", "caption": "x"}\n{"image": "b.png", "cap\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=r"p\.jsonl:2: malformed JSONL"):
        PairsDataset(tmp_path / "p.jsonl")
    ds = PairsDataset(tmp_path / "p.jsonl", strict=False)  # doctor mode: counted instead
    assert len(ds) == 1 and ds.stats["malformed_row"] == 1


def test_corrupt_five_percent_iterates_to_the_end(tmp_path):
    """100 rows, 5 bad (zero-byte, missing, corrupt, not an image): every batch stays full."""
    bad = [7, 23, 48, 61, 90]
    make_images(tmp_path / "img", 100, bad=bad)
    write_csv(tmp_path / "p.csv", [(f"img/{i:04d}.png", f"c{i}") for i in range(100)])
    ds = PairsDataset(tmp_path / "p.csv", transform=tf, tokenizer=tok)
    loader = ResumableLoader(ds, batch_size=10, shuffle=True, seed=1)
    batches = list(loader)
    assert len(batches) == 10 and all(b[0].shape == (10, 3, 8, 8) for b in batches)
    assert ds.skipped.total == 5
    assert ds.skipped.counts() == {"empty": 2, "missing": 1, "truncated": 1, "not_an_image": 1}
    # the report names the row (header is line 1) and the path of each skipped image
    (missing,) = ds.skipped.examples()["missing"]
    assert "p.csv:25" in missing and "0023.png" in missing
    assert "skipped 5" in loader.skipped.summary()


def test_skip_counts_reach_main_process_from_workers(tmp_path):
    bad = [3, 11, 19, 27]
    make_images(tmp_path / "img", 40, bad=bad)
    write_csv(tmp_path / "p.csv", [(f"img/{i:04d}.png", f"c{i}") for i in range(40)])
    ds = PairsDataset(tmp_path / "p.csv", transform=tf, tokenizer=tok)
    n = sum(1 for _ in ResumableLoader(ds, batch_size=4, num_workers=2, shuffle=False))
    assert n == 10
    assert ds.skipped.total >= 4  # each worker counts each bad item it meets once


def test_on_bad_none_and_collate(tmp_path):
    make_images(tmp_path, 4, bad=[1])
    write_csv(tmp_path / "p.csv", [(f"{i:04d}.png", f"c{i}") for i in range(4)])
    ds = PairsDataset(tmp_path / "p.csv", transform=tf, tokenizer=tok, on_bad="none")
    items = [ds[i] for i in range(4)]
    assert items[1] is None
    imgs, toks = collate_pairs(items)
    assert imgs.shape == (3, 3, 8, 8) and toks.shape == (3, 8)
    assert collate_pairs([None, None]) is None


def test_all_bad_raises_clear_error(tmp_path):
    write_csv(tmp_path / "p.csv", [(f"nope{i}.png", "c") for i in range(5)])
    ds = PairsDataset(tmp_path / "p.csv", max_retries=3)
    with pytest.raises(DataError, match="relative to the table"):
        ds[0]


def test_folder_pairs_recursive(tmp_path):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "a" / "b", 1)
    (tmp_path / "a" / "0000.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "a" / "0001.txt").write_text("   \n", encoding="utf-8")  # empty -> skipped
    (tmp_path / "a" / "b" / "0000.txt").write_bytes(b"caf\xe9")  # latin-1 -> replaced
    ds = FolderPairsDataset(tmp_path, tokenizer=tok, transform=tf)
    assert len(ds) == 2
    assert ds.all_captions == [["one", "two"], ["caf\ufffd"]]
    assert ds.stats["empty_caption"] == 1 and ds.stats["non_utf8"] == 1
    assert ds.skipped["empty_caption"] == 1
    with pytest.raises(DataError, match="not found"):
        FolderPairsDataset(tmp_path / "nope")


def test_split_spec():
    assert split_spec("a.csv") == [("a.csv", 1.0)]
    assert split_spec("a.csv::0.7,b.tsv::0.3") == [("a.csv", 0.7), ("b.tsv", 0.3)]
    assert split_spec("s/{a,b}.tar::2,c.csv") == [("s/{a,b}.tar", 2.0), ("c.csv", 1.0)]
    with pytest.raises(DataError, match="bad weight"):
        split_spec("a.csv::x")


def test_build_dataset_kinds(tmp_path, table):
    assert isinstance(build_dataset(str(table)), PairsDataset)
    folder = tmp_path / "f"
    make_images(folder, 1)
    (folder / "0000.txt").write_text("x", encoding="utf-8")
    assert isinstance(build_dataset(str(folder)), FolderPairsDataset)
    syn = build_dataset("synthetic:shapes?n=12&split=val")
    assert isinstance(syn, SyntheticShapes) and len(syn) == 12 and syn.split == "val"
    with pytest.raises(DataError, match="not found"):
        build_dataset(str(tmp_path / "nope.csv"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(DataError, match="cannot tell"):
        build_dataset(str(tmp_path / "x.bin"))
    with pytest.raises(DataError, match="unknown option"):
        build_dataset("synthetic:shapes?colour=red")


def test_mix_weights_and_determinism(table):
    a = SyntheticShapes(50, seed=1)
    b = PairsDataset(table)
    counter = SkipCounter()
    mix = MixDataset([a, b], [0.8, 0.2], seed=3, length=2000, skip_counter=counter)
    picks = [mix.locate(i)[0] for i in range(2000)]
    share = picks.count(0) / len(picks)
    assert 0.76 < share < 0.84
    assert picks == [MixDataset([a, b], [0.8, 0.2], seed=3, length=2000).locate(i)[0] for i in range(2000)]
    mix.set_epoch(1)
    assert [mix.locate(i) for i in range(50)] != [
        MixDataset([a, b], [0.8, 0.2], seed=3).locate(i) for i in range(50)
    ]
    spec_mix = build_dataset(f"synthetic:shapes?n=30::0.5,{table}::0.5")
    assert isinstance(spec_mix, MixDataset) and len(spec_mix) == 50


def test_loader_resume_map_style_exact():
    ds = SyntheticShapes(64, transform=tf, tokenizer=tok)
    full = [b[1] for b in ResumableLoader(ds, batch_size=4, seed=5)]
    loader = ResumableLoader(ds, batch_size=4, seed=5)
    it = iter(loader)
    head = [next(it)[1] for _ in range(6)]
    state = json.loads(json.dumps(loader.state_dict()))  # must be plain data
    resumed = ResumableLoader(SyntheticShapes(64, transform=tf, tokenizer=tok), batch_size=4, seed=5)
    resumed.load_state_dict(state)
    tail = [b[1] for b in resumed]
    assert len(full) == 16 and len(head) + len(tail) == 16
    assert all(torch.equal(x, y) for x, y in zip(full, head + tail))
    assert resumed.epoch == 1 and resumed.batches_done == 0  # next iter() is a new epoch
    epoch1 = [b[1] for b in resumed]
    assert not all(torch.equal(x, y) for x, y in zip(full, epoch1))  # reshuffled
    bad = dict(state, batch_size=8)
    with pytest.raises(DataError, match="batch_size"):
        ResumableLoader(ds, batch_size=4, seed=5).load_state_dict(bad)


class Noisy(torch.utils.data.Dataset):
    """Item i is (i + a random augmentation drawn from torch's global RNG, i)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]) + torch.rand(1), i


def test_loader_random_augmentation_is_a_property_of_the_sample():
    """Per-sample seeding: the same sample gets the same augmentation with 0 or 2 workers and
    when the epoch is resumed mid-way; the next epoch draws new ones."""
    full = torch.cat([b[0] for b in ResumableLoader(Noisy(), batch_size=4, seed=3)])
    workers = torch.cat([b[0] for b in ResumableLoader(Noisy(), batch_size=4, seed=3, num_workers=2)])
    assert torch.equal(full, workers)
    loader = ResumableLoader(Noisy(), batch_size=4, seed=3)
    it = iter(loader)
    head = [next(it)[0] for _ in range(2)]
    resumed = ResumableLoader(Noisy(), batch_size=4, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert torch.equal(full, torch.cat(head + [b[0] for b in resumed]))
    epoch1 = torch.cat([b[0] for b in resumed])
    assert not torch.equal(epoch1.sort().values, full.sort().values)


def test_loader_leaves_the_callers_rng_alone():
    """Loading a batch (which seeds per sample) must not move the RNG the model draws from."""
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    next(iter(ResumableLoader(Noisy(), batch_size=4, seed=3)))
    assert torch.equal(torch.rand(3), expected)


def test_loader_steps_per_epoch_and_position_after_the_last_batch():
    """An epoch is cut at ``steps_per_epoch``; once its last batch is handed out the position is
    the next epoch's first batch, so a state saved while that batch trains resumes there."""
    loader = ResumableLoader(Noisy(), batch_size=4, seed=3, steps_per_epoch=2)
    assert len(loader) == 2
    seen, states = [], []
    for _, idx in loader:
        seen.append(idx)
        states.append(loader.state_dict())
    assert len(seen) == 2
    assert (states[0]["epoch"], states[0]["batches_done"]) == (0, 1)
    assert (states[1]["epoch"], states[1]["batches_done"]) == (1, 0)
    expected = [b[1] for b in loader]  # epoch 1 continues from here
    resumed = ResumableLoader(Noisy(), batch_size=4, seed=3, steps_per_epoch=2)
    resumed.load_state_dict(states[1])
    assert [torch.equal(a, b) for a, b in zip([b[1] for b in resumed], expected)] == [True, True]
    assert len(ResumableLoader(Noisy(), batch_size=4, steps_per_epoch=100)) == 6  # capped at a full pass


def test_loader_ranks_disjoint():
    ds = SyntheticShapes(50)
    r0 = ResumableLoader(ds, batch_size=5, rank=0, world_size=2, seed=2)._sampler(0).indices()
    r1 = ResumableLoader(ds, batch_size=5, rank=1, world_size=2, seed=2)._sampler(0).indices()
    assert len(r0) == len(r1) == 25 and not set(r0) & set(r1) and set(r0) | set(r1) == set(range(50))
    assert len(ResumableLoader(ds, batch_size=5, rank=0, world_size=2)) == 5


def test_build_loader_from_spec():
    loader = build_loader("synthetic:shapes?n=20", batch_size=4, transform=tf, tokenizer=tok)
    images, tokens = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and tokens.shape == (4, 8)
    assert len(loader) == 5


def test_doctor_reports_reasons_and_rows(tmp_path):
    from clipforge.data.doctor import scan_dataset

    make_images(tmp_path / "img", 10, bad=[2, 5, 8])  # zero-byte, missing, corrupt
    rows = [(f"img/{i:04d}.png", f"c{i}") for i in range(10)] + [("img/0000.png", ""), ("../x.png", "y")]
    write_csv(tmp_path / "p.csv", rows + [("img/0001.png", "c1")])
    rep = scan_dataset(str(tmp_path / "p.csv"), confine=True)
    assert rep.kind == "table" and rep.items == 13 and rep.usable == 8
    assert rep.skipped == {"empty": 1, "missing": 1, "truncated": 1, "empty_caption": 1, "path_escape": 1}
    # Confinement is opt-in: by default "../x.png" is just a path, here a missing file.
    default = scan_dataset(str(tmp_path / "p.csv"))
    assert default.skipped == {"empty": 1, "missing": 2, "truncated": 1, "empty_caption": 1}
    assert rep.repaired == {"duplicate_rows": 1}
    assert any("p.csv:7" in e and "0005.png" in e for e in rep.examples["missing"])
    assert rep.to_dict()["total_skipped"] == 5
    assert "would skip: 5" in rep.format()


def test_doctor_cli_json_and_strict(tmp_path, capsys):
    from clipforge.cli import main

    make_images(tmp_path / "img", 3, bad=[1])
    write_csv(tmp_path / "p.csv", [(f"img/{i:04d}.png", f"c{i}") for i in range(3)])
    assert main(["doctor", str(tmp_path / "p.csv"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skipped"] == {"empty": 1} and out["usable"] == 2
    assert main(["doctor", str(tmp_path / "p.csv"), "--json", "--strict"]) == 1
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err

"""Webdataset shards: writing, splitting without duplicates, corrupt samples, exact resume."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data import build_dataset
from clipforge.data.loader import ResumableLoader
from clipforge.data.pairs import PairsDataset
from clipforge.data.shards import ShardDataset, expand_urls, write_shards
from clipforge.data.synthetic import SyntheticShapes
from clipforge.errors import DataError


def tf(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((8, 8)))).permute(2, 0, 1).float() / 255


def _png(colour) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(b, "PNG")
    return b.getvalue()


def write_raw_shards(folder, n_shards, per_shard, *, corrupt=()):
    """Shards written directly (caption 'sNNN' = global sample number); ``corrupt`` numbers get
    broken image bytes, so the reader - not the writer - has to skip them."""
    from webdataset import TarWriter

    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with TarWriter(str(folder / f"shard-{s:06d}.tar")) as w:
            for _ in range(per_shard):
                img = b"\xff\xd8\xff\xe0garbage" if k in corrupt else _png((k % 256, k // 256, 0))
                w.write({"__key__": f"{k:06d}", "png": img, "txt": f"s{k:03d}"})
                k += 1
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def captions(batches):
    return [c for b in batches for c in b[1]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_raw_shards(tmp_path_factory.mktemp("sh"), 8, 12)  # 96 samples, no manifest


def test_write_shards_from_table(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    rows = ["image,caption"]
    for i in range(25):
        p = img / f"{i}.png"
        if i == 4:
            p.write_bytes(b"")  # skipped: zero bytes
        elif i != 9:  # 9 is missing
            Image.new("RGB", (10, 10), (i, 0, 0)).save(p)
        rows.append(f"img/{i}.png,cap {i}")
    Image.new("RGB", (10, 10), (1, 2, 3)).save(img / "j.jpg", quality=95)
    rows.append("img/j.jpg,a jpeg")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    res = write_shards(PairsDataset(tmp_path / "t.csv"), tmp_path / "out", max_count=10)
    assert res.counts == [10, 10, 4] and res.total == 24
    assert res.skipped == {"empty": 1, "missing": 1}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total"] == 24 and [s["count"] for s in manifest["shards"]] == [10, 10, 4]
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left
    with tarfile.open(res.paths[2]) as t:
        names = t.getnames()
    assert {"000000025.jpg", "000000025.txt", "000000025.json"} <= set(names)  # kept as JPEG
    ds = ShardDataset(res.pattern, shuffle=False)
    got = list(ds)
    assert [c for _, c in got] == [f"cap {i}" for i in range(25) if i not in (4, 9)] + ["a jpeg"]
    assert got[0][0].getpixel((0, 0)) == (0, 0, 0) and got[5][0].getpixel((0, 0)) == (6, 0, 0)


def test_webdataset_can_read_our_shards(tmp_path):
    import webdataset as wds

    res = write_shards(SyntheticShapes(7), tmp_path, max_count=4)
    samples = list(
        wds.WebDataset(res.pattern, shardshuffle=False).decode("pil").to_tuple("png", "txt", "json")
    )
    assert len(samples) == 7 and samples[0][1] == SyntheticShapes(7).caption_for(0)
    assert samples[0][2]["captions"] == [samples[0][1]]


def test_expand_urls(shards, tmp_path):
    assert len(expand_urls(shards)) == 8
    folder = shards.rsplit("/", 1)[0]
    assert expand_urls(folder) == expand_urls(shards)
    with pytest.raises(DataError, match="shard not found"):
        expand_urls(folder + "/shard-{000000..000009}.tar")
    with pytest.raises(DataError, match="only local"):
        expand_urls("https://x/y.tar")


def test_reads_every_sample_once(shards):
    for shuffle in (False, True):
        got = [c for _, c in ShardDataset(shards, shuffle=shuffle, buffer_size=20)]
        assert sorted(got) == [f"s{k:03d}" for k in range(96)]
    ds = ShardDataset(shards, seed=1, buffer_size=20)
    e0 = [c for _, c in ds]
    ds.set_epoch(1)
    e1 = [c for _, c in ds]
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert e0 == [c for _, c in ShardDataset(shards, seed=1, buffer_size=20)]  # deterministic


def test_no_duplicates_across_ranks_and_workers(tmp_path):
    # 9 full shards + 1 short: 4 slots get 2 whole shards each, the rest is split per sample.
    pattern = write_raw_shards(tmp_path, 10, 10)
    with tarfile.open(tmp_path / "shard-000009.tar", "w") as t:  # make the last shard short
        for k in range(90, 95):
            for ext, data in (("png", _png((1, 1, 1))), ("txt", f"s{k:03d}".encode())):
                info = tarfile.TarInfo(f"{k:06d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    per_rank = []
    for rank in range(2):
        ds = ShardDataset(pattern, transform=tf, rank=rank, world_size=2, seed=3, buffer_size=16)
        loader = ResumableLoader(ds, batch_size=4, num_workers=2, drop_last=False, seed=3)
        per_rank.append(captions(list(loader)))
    everything = per_rank[0] + per_rank[1]
    assert len(set(everything)) == len(everything)  # no duplicates
    assert len(per_rank[0]) == len(per_rank[1])  # equal steps on every rank
    assert len(everything) >= 95 - 3  # equalize drops fewer than one sample per slot
    assert set(everything) <= {f"s{k:03d}" for k in range(95)}


def noisy_tf(img: Image.Image) -> torch.Tensor:
    """A random augmentation (torch's global RNG): must come out the same after a resume."""
    return tf(img) + torch.rand(1)


def _resume_check(pattern, *, workers, corrupt_expected, stop_after):
    def make():
        ds = ShardDataset(pattern, transform=noisy_tf, seed=7, buffer_size=10)
        return ds, ResumableLoader(ds, batch_size=3, num_workers=workers, seed=7)

    ds, loader = make()
    batches = list(loader)
    full, full_images = captions(batches), torch.cat([b[0] for b in batches])
    assert ds.skipped.total == corrupt_expected
    ds, loader = make()
    it = iter(loader)
    head = [next(it) for _ in range(stop_after)]
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    ds2, resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert captions(head) + captions(tail) == full
    assert torch.equal(torch.cat([b[0] for b in head + tail]), full_images)  # same augmentations
    assert len(set(full)) == len(full)
    return full


def test_resume_mid_epoch_exact_in_process(tmp_path):
    pattern = write_raw_shards(tmp_path, 4, 10, corrupt={2, 13, 27})
    full = _resume_check(pattern, workers=0, corrupt_expected=3, stop_after=5)
    assert len(full) == 36 // 3 * 3


@pytest.mark.slow
def test_resume_mid_epoch_exact_with_workers(tmp_path):
    """Two workers, corrupt samples in both workers' streams, stop at an odd batch count (the
    resumed DataLoader must start its round-robin at the other worker)."""
    pattern = write_raw_shards(tmp_path, 4, 10, corrupt={2, 13, 27})
    for stop in (3, 6):
        _resume_check(pattern, workers=2, corrupt_expected=3, stop_after=stop)


def test_dataset_state_dict_main_process(shards):
    """Trainers that pull samples in the main process can checkpoint the dataset itself."""
    ds = ShardDataset(shards, seed=2, buffer_size=8)
    ds.set_epoch(1)
    full = [c for _, c in ds]
    ds = ShardDataset(shards, seed=2, buffer_size=8)
    ds.set_epoch(1)
    it = iter(ds)
    head = [next(it)[1] for _ in range(37)]
    state = ds.state_dict()
    fresh = ShardDataset(shards, seed=2, buffer_size=8)
    fresh.load_state_dict(state)
    assert head + [c for _, c in fresh] == full
    assert [c for _, c in fresh] == full  # after a completed epoch a new iter() starts it over
    assert len(fresh) == 96


def test_resampled_epochs(shards):
    ds = ShardDataset(shards, resampled=True, samples_per_epoch=50, seed=4)
    got = [c for _, c in ds]
    assert len(got) == 50 and set(got) <= {f"s{k:03d}" for k in range(96)}
    assert got == [c for _, c in ShardDataset(shards, resampled=True, samples_per_epoch=50, seed=4)]
    ds.set_epoch(1)
    assert [c for _, c in ds] != got


def test_damaged_tar_yields_what_it_can(tmp_path):
    pattern = write_raw_shards(tmp_path, 1, 10)
    path = tmp_path / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    got = [c for _, c in ShardDataset(pattern, shuffle=False)]
    assert 1 <= len(got) < 10 and got == [f"s{k:03d}" for k in range(len(got))]


def test_build_dataset_shard_specs(shards):
    folder = shards.rsplit("/", 1)[0]
    assert isinstance(build_dataset(shards), ShardDataset)
    assert isinstance(build_dataset(folder), ShardDataset)
    ds = build_dataset(shards, rank=1, world_size=2, resampled=False)
    assert ds.rank == 1 and ds.world_size == 2


def test_shards_make_cli_and_doctor(tmp_path, capsys):
    from clipforge.cli import main
    from clipforge.data.doctor import scan_dataset

    out = tmp_path / "sh"
    assert main(["shards", "make", "synthetic:shapes?n=9", "--out", str(out), "--max-count", "4"]) == 0
    assert "wrote 9 sample(s) in 3 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [
        f"shard-{i:06d}.tar" for i in range(3)
    ]
    rep = scan_dataset(str(out))
    assert rep.kind == "shards" and rep.items == 9 and rep.usable == 9 and not rep.skipped
    pattern = write_raw_shards(tmp_path / "bad", 1, 6, corrupt={1, 4})
    rep = scan_dataset(pattern)
    assert rep.items == 6 and rep.usable == 4 and rep.skipped == {"truncated": 2}
    assert all("shard-000000.tar" in e for e in rep.examples["truncated"])

"""synthetic:shapes: deterministic, split-correct, captions match pixels, usable from the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.data.pairs import PairsDataset
from clipforge.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    SyntheticShapes,
    class_names,
    label_of,
    retrieval_set,
    write_synthetic,
    zero_shot_set,
)
from clipforge.errors import DataError


def test_deterministic_by_seed_and_index():
    a, b = SyntheticShapes(20, seed=3), SyntheticShapes(20, seed=3)
    for i in (0, 7, 19):
        assert a.caption_for(i) == b.caption_for(i)
        assert np.array_equal(np.asarray(a.get_image(i)), np.asarray(b[i][0]))
    c = SyntheticShapes(20, seed=4)
    assert [a.caption_for(i) for i in range(20)] != [c.caption_for(i) for i in range(20)]


def test_caption_format_and_pixels_agree():
    ds = SyntheticShapes(40, image_size=64)
    for i in range(40):
        spec = ds.spec(i)
        cap = ds.caption_for(i)
        assert cap.startswith(f"a {spec.size} {spec.colour} {spec.shape} ")
        assert cap.endswith(f"on a {spec.background} background")
        arr = np.asarray(ds.get_image(i)).astype(int)
        assert arr.shape == (64, 64, 3)
        # corners are background; the named colour is present somewhere
        assert np.abs(arr[0, 0] - BACKGROUNDS[spec.background]).max() <= 2
        dist = np.abs(arr - np.array(COLOURS[spec.colour])).max(-1)
        n = int((dist <= 2).sum())
        assert n > (40 if spec.size == "small" else 250)
        ys, xs = np.nonzero(dist <= 2)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
        assert expected.get(spec.position, 0.4 < cx < 0.6 and 0.4 < cy < 0.6)
        assert spec.background != spec.colour


def test_splits_hold_out_combinations():
    train = SyntheticShapes(600, split="train")
    held = SyntheticShapes(200, split="heldout")
    train_pairs = {(train.spec(i).shape, train.spec(i).colour) for i in range(600)}
    held_pairs = {(held.spec(i).shape, held.spec(i).colour) for i in range(200)}
    assert not train_pairs & HELDOUT_PAIRS
    assert held_pairs == set(HELDOUT_PAIRS)
    assert {s for s, _ in HELDOUT_PAIRS} == set(SHAPES) and {c for _, c in HELDOUT_PAIRS} == set(COLOURS)
    assert len(train_pairs) == len(SHAPES) * len(COLOURS) - len(HELDOUT_PAIRS)
    val = SyntheticShapes(50, split="val")
    assert [val.caption_for(i) for i in range(50)] != [train.caption_for(i) for i in range(50)]
    with pytest.raises(DataError, match="split"):
        SyntheticShapes(5, split="test-ish")


def test_zero_shot_helpers():
    ds, labels, names = zero_shot_set(60, task="shape")
    assert names == list(SHAPES) and len(labels) == 60
    assert all(names[lab] == ds.spec(i).shape for i, lab in enumerate(labels))
    assert class_names("colour") == list(COLOURS)
    cs = class_names("colour_shape")
    assert (
        len(cs) == 36
        and cs[label_of(ds.spec(0), "colour_shape")] == f"{ds.spec(0).colour} {ds.spec(0).shape}"
    )
    with pytest.raises(DataError):
        class_names("size")


def test_retrieval_set_has_distinct_captions():
    images, caps = retrieval_set(80, split="heldout")
    assert len(images) == len(caps) == 80 and len(set(caps)) == 80
    assert images[0].size == (64, 64)


def test_transform_and_tokenizer_applied():
    import torch

    ds = SyntheticShapes(
        4, transform=lambda im: torch.zeros(3, 2, 2), tokenizer=lambda s: torch.ones(1, 5, dtype=torch.long)
    )
    img, tok = ds[1]
    assert img.shape == (3, 2, 2) and tok.shape == (5,)
    with pytest.raises(IndexError):
        ds[4]


def test_write_synthetic_roundtrip(tmp_path):
    table = write_synthetic(tmp_path, 12, seed=5)
    ds = PairsDataset(table)
    assert len(ds) == 12
    ref = SyntheticShapes(12, seed=5)
    assert ds.all_captions[3] == [ref.caption_for(3)]
    assert np.array_equal(np.asarray(ds.get_image(3)), np.asarray(ref.get_image(3)))


def test_varied_captions_name_subsets_deterministically():
    ds = SyntheticShapes(400, caption_style="varied")
    caps = [ds.caption_for(i) for i in range(400)]
    assert caps == [SyntheticShapes(400, caption_style="varied").caption_for(i) for i in range(400)]
    full = SyntheticShapes(400)
    for i, cap in enumerate(caps):
        spec = ds.spec(i)
        words = cap.split()
        assert spec.shape in words or (spec.colour in words and "shape" in words), cap
        assert set(cap.split()) <= set(full.caption_for(i).split()) | {"an", "shape"}
        assert (words[0] == "an") == (words[1][0] in "aeiou"), cap
    # every attribute is sometimes left out, and full captions still occur
    assert any(c == full.caption_for(i) for i, c in enumerate(caps))
    assert sum("background" not in c for c in caps) > 100 and sum(" shape" in c for c in caps) > 20
    ds.set_epoch(1)
    assert sum(ds.caption_for(i) != c for i, c in enumerate(caps)) > 200  # new phrasing each epoch
    with pytest.raises(DataError, match="caption_style"):
        SyntheticShapes(4, caption_style="poetic")

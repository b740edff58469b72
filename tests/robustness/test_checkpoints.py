"""Hostile and broken checkpoints: each is refused with a message naming the file, nothing runs.

Cases (issue 7): truncated file, wrong architecture (missing/unexpected keys, shape mismatches,
closest registered architecture), a pickle that would execute code, a newer clipforge format, plus
empty files, corrupt configs, and a failed (disk-full) save leaving the previous file intact.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import pytest
import torch
from helpers import seeded_model

from clipforge.atomic import atomic_save
from clipforge.checkpoints.clipforge_format import save_pretrained
from clipforge.checkpoints.io import safe_torch_load, save_safetensors
from clipforge.checkpoints.load import load_checkpoint
from clipforge.errors import CheckpointError, UnsafeCheckpointError
from clipforge.factory import create_model


class _Payload:
    """Unpickling this would create ``marker`` (the stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class _OsPayload(_Payload):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny():
    return seeded_model("tiny-vit")


# --- code execution ---------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [_Payload, _OsPayload], ids=["exec", "os.system"])
def test_malicious_torch_save_is_refused_and_never_runs(tmp_path, tiny, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    sd = dict(tiny.state_dict())
    sd["visual.proj"] = payload(str(marker))  # hidden among real weights
    torch.save({"state_dict": sd}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        create_model("tiny-vit", pretrained=path)
    assert str(path) in str(err.value)
    assert ("exec" in str(err.value)) or ("system" in str(err.value))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(tiny, path)
    assert not marker.exists()


def test_malicious_object_inside_numpy_array_is_refused(tmp_path):
    """numpy values are allowed in checkpoints; objects hidden inside an object array are not."""
    np = pytest.importorskip("numpy")
    marker = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = _Payload(str(marker))
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": arr}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="exec"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"w": _Payload(str(marker))}, protocol=2))  # not even a torch zip
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_malicious_torchscript_archive_is_refused(tmp_path):
    """A TorchScript-looking zip whose data.pkl calls exec: our reader rejects the global."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(str(marker)), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match="exec") as err:
        create_model(None, pretrained=path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_torchscript_archive_code_is_not_run(tmp_path, monkeypatch):
    """Reading an OpenAI-style archive must not go through torch.jit.load (which runs its code)."""
    from open_clip.model import CLIP as OpenClipCLIP

    torch.manual_seed(0)
    oc = OpenClipCLIP(
        embed_dim=64,
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    ).eval()
    images, tokens = torch.randn(1, 3, 32, 32), torch.randint(1, 100, (1, 77))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            oc, {"encode_image": images, "encode_text": tokens}, check_trace=False
        )
        torch.jit.save(traced, str(tmp_path / "m.pt"))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    model = create_model(None, pretrained=tmp_path / "m.pt")
    assert model.config.vision.layers == 1


# --- broken files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pt", "safetensors", "clipforge-dir", "torchscript"])
def test_truncated_checkpoint_names_the_file(tmp_path, tiny, kind):
    if kind == "pt":
        path = tmp_path / "w.pt"
        torch.save(tiny.state_dict(), path)
    elif kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_safetensors(tiny.state_dict(), path)
    elif kind == "clipforge-dir":
        save_pretrained(tiny, tmp_path / "ck")
        path = tmp_path / "ck" / "model.safetensors"
    else:
        path = tmp_path / "ts.pt"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("ts/data.pkl", b"\x80\x02}q\x00.")
            z.writestr("ts/constants.pkl", b"\x80\x02).")
        path.write_bytes(buf.getvalue())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source = tmp_path / "ck" if kind == "clipforge-dir" else path
    with pytest.raises(CheckpointError) as err:
        create_model("tiny-vit", pretrained=source)
    assert str(path) in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        create_model("tiny-vit", pretrained=path)


def test_not_a_checkpoint_at_all(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError) as err:
        create_model("tiny-vit", pretrained=path)
    assert str(path) in str(err.value)


def test_corrupt_config_json(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text('{"format_version": 1, "model_config": {')
    with pytest.raises(CheckpointError) as err:
        create_model(pretrained=tmp_path / "ck")
    assert str(tmp_path / "ck" / "config.json") in str(err.value) and "invalid JSON" in str(err.value)


# --- wrong architecture -----------------------------------------------------------------------------
def test_wrong_architecture_lists_keys_and_suggests_closest(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "tiny-vit.pt")
    with pytest.raises(CheckpointError) as err:
        create_model("tiny-rn", pretrained=tmp_path / "tiny-vit.pt")
    msg = str(err.value)
    assert str(tmp_path / "tiny-vit.pt") in msg
    assert "missing keys" in msg and "visual.attnpool.c_proj.weight" in msg
    assert "unexpected keys" in msg and "visual.class_embedding" in msg
    assert "'tiny-vit'" in msg  # closest registered architecture


def test_shape_mismatch_is_reported_even_when_not_strict(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "w.pt")
    other = create_model("tiny-vit", vision={"patch_size": 16})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other, tmp_path / "w.pt", strict=False)
    msg = str(err.value)
    assert (
        "shape mismatches" in msg
        and "visual.conv1.weight: checkpoint [64, 3, 8, 8] vs model [64, 3, 16, 16]" in msg
    )
    assert "matches the registered architecture 'tiny-vit'" in msg


def test_missing_keys_listed(tmp_path, tiny):
    sd = {k: v for k, v in tiny.state_dict().items() if not k.startswith("text.transformer.resblocks.1.")}
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(12\).*text\.transformer\.resblocks\.1\."):
        load_checkpoint(create_model("tiny-vit"), tmp_path / "partial.pt")


# --- format versions and interrupted saves ---------------------------------------------------------
def test_newer_format_version_is_refused(tmp_path, tiny):
    save_pretrained(tiny, tmp_path / "ck")
    config = tmp_path / "ck" / "config.json"
    doc = json.loads(config.read_text())
    doc["format_version"] = 99
    doc["clipforge_version"] = "9.0.0"
    config.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as err:
        create_model(pretrained=tmp_path / "ck")
    msg = str(err.value)
    assert "format_version 99" in msg and "9.0.0" in msg and "Upgrade clipforge" in msg and str(config) in msg


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, tiny, monkeypatch):
    save_pretrained(tiny, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        changed = create_model("tiny-vit")
    with pytest.raises(OSError, match="No space"):
        save_pretrained(changed, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    create_model(pretrained=tmp_path / "ck")  # still loadable

    with pytest.raises(RuntimeError):  # same guarantee for torch.save-based writers
        atomic_save({"x": object.__new__(_Unpicklable)}, tmp_path / "ck" / "extra.pt")
    assert not (tmp_path / "ck" / "extra.pt").exists()


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")

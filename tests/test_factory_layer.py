"""The factory layer: strict loads build parameters on the meta device, configs are frozen, and
``-quickgelu`` is parsed in one place.

A strict load must give exactly the model an ordinary build + ``load_state_dict`` gives: the same
parameters and persistent buffers (from the checkpoint), the same non-persistent buffers (computed
in ``__init__``: rotary tables, position ids), the same dtypes and ``requires_grad``, and tensors
that share no storage with the loaded state dict.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch import nn

from clipforge.checkpoints.clipforge_format import save_pretrained
from clipforge.checkpoints.load import load_any
from clipforge.factory import create_model, get_model_config
from clipforge.model import registry
from clipforge.model.build import build_model
from clipforge.model.skeleton import meta_tensor_names, parameters_on_meta

#: Built-in towers, a ResNet with BatchNorm statistics, a CoCa, and timm trunks whose buffers
#: (EVA-02's rotary embedding, ConvNeXt's norms) are computed when they are built.
NAMES = ["tiny-vit", "tiny-rn", "tiny-coca", "tiny-siglip", "tiny-eva02", "tiny-convnext"]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return dict(named)


@pytest.mark.parametrize("name", NAMES)
def test_strict_load_equals_an_ordinary_build_and_load(name: str, tmp_path) -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    source = create_model(name)
    folder = save_pretrained(source, tmp_path / name)
    loaded = create_model(None, pretrained=folder)
    reference = build_model(source.config)
    reference.load_state_dict(load_any(folder).state_dict, strict=True)
    ours, theirs = _tensors(loaded), _tensors(reference)
    assert sorted(ours) == sorted(theirs)
    assert meta_tensor_names(loaded) == []
    for key, tensor in theirs.items():
        got = ours[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert got.stride() == tensor.stride(), key
        assert torch.equal(got, tensor), key
        assert got.requires_grad == tensor.requires_grad, key


def test_loaded_tensors_share_no_storage_with_the_checkpoint(tmp_path) -> None:
    folder = save_pretrained(create_model("tiny-vit"), tmp_path / "m")
    sd = load_any(folder).state_dict
    model = create_model(None, pretrained=folder)
    theirs = {t.untyped_storage().data_ptr() for t in sd.values()}
    ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert ours.isdisjoint(theirs)
    before = model.visual.conv1.weight.detach().clone()
    with torch.no_grad():
        model.visual.conv1.weight.add_(1.0)
    assert torch.equal(sd["visual.conv1.weight"], before)


def test_fp16_checkpoint_loads_into_fp32_parameters_as_before(tmp_path) -> None:
    source = create_model("tiny-vit").half()
    folder = save_pretrained(source, tmp_path / "half")
    model = create_model(None, pretrained=folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight.float())


def test_parameters_on_meta_is_local_to_its_thread() -> None:
    seen: dict[str, bool] = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        inside.wait(5)
        seen["other"] = nn.Linear(4, 4).weight.is_meta  # built while the main thread is in the block
        release.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with parameters_on_meta():
        layer = nn.Linear(4, 4)
        buffers = nn.BatchNorm1d(4)
        inside.set()
        release.wait(5)
    worker.join(5)
    assert layer.weight.is_meta and layer.bias.is_meta
    assert not buffers.running_mean.is_meta and buffers.running_var.tolist() == [1.0] * 4
    assert seen == {"other": False}
    assert not nn.Linear(4, 4).weight.is_meta  # off again after the block


def test_configs_are_frozen_and_the_registry_shared_safely() -> None:
    cfg = registry.get_model_config("tiny-vit")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.embed_dim = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vision.width = 3  # type: ignore[misc]
    changed = cfg.replace(embed_dim=32, vision={"layers": 1})
    assert (changed.embed_dim, changed.vision.layers) == (32, 1)
    assert (cfg.embed_dim, cfg.vision.layers) == (64, 2)
    assert registry.get_model_config("tiny-vit") is cfg


def test_quickgelu_suffix_parsed_in_one_place() -> None:
    assert registry.split_quickgelu("ViT-B-32-quickgelu") == ("ViT-B-32", True)
    assert registry.split_quickgelu("ViT-B-32") == ("ViT-B-32", False)
    assert registry.with_quickgelu("ViT-B-32", True) == "ViT-B-32-quickgelu"
    quick = registry.get_model_config("tiny-vit-quickgelu")
    assert quick.quick_gelu is True and registry.get_model_config("tiny-vit").quick_gelu is False
    assert quick.replace(quick_gelu=False) == registry.get_model_config("tiny-vit")
    assert create_model("tiny-vit-quickgelu").architecture == "tiny-vit-quickgelu"


def test_get_model_config_reads_files_at_the_factory_layer(tmp_path) -> None:
    path = tmp_path / "arch.json"
    path.write_text(registry.get_model_config("tiny-rn").to_json())
    assert get_model_config(path) == registry.get_model_config("tiny-rn")
    with pytest.raises(Exception, match="model config file"):
        registry.get_model_config(str(path))

"""Architectures from files (``create_model("arch.json")``, ``--model arch.json``), honest
architecture names, and QuickGELU for OpenAI-format checkpoints under explicit names.

open_clip is the oracle: it builds the same JSON its own way, and its random weights, converted
with clipforge's open_clip converter, must give the same features.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import OC_TINY_TEXT as TINY_TEXT
from helpers import OC_TINY_VIT_96

from clipforge.checkpoints.config_file import read_config_file
from clipforge.checkpoints.load import closest_architecture
from clipforge.checkpoints.open_clip import open_clip_to_clipforge
from clipforge.errors import ConfigError
from clipforge.factory import create_model, get_tokenizer
from clipforge.model.architecture import architecture_name, model_source, same_architecture
from clipforge.model.registry import get_model_config

open_clip = pytest.importorskip("open_clip")

#: Shipped the way open_clip's model_configs/*.json are: only the fields that differ from defaults.
OPEN_CLIP_JSONS = {
    "vit": {
        "embed_dim": 48,
        "vision_cfg": {**OC_TINY_VIT_96, "mlp_ratio": 3.0},
        "text_cfg": TINY_TEXT,
    },
    "vit-quickgelu-customtext": {
        "embed_dim": 64,
        "quick_gelu": True,
        "custom_text": True,
        "vision_cfg": {"image_size": 48, "layers": 3, "width": 64, "patch_size": 16, "head_width": 16},
        "text_cfg": {**TINY_TEXT, "context_length": 32, "width": 96, "heads": 3},
    },
    "rn": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16},
        "text_cfg": TINY_TEXT,
    },
}
_counter = itertools.count()


def write_json(tmp_path: Path, data: dict, name: str = "my-arch.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=4))
    return path


def open_clip_from_json(path: Path) -> torch.nn.Module:
    """open_clip's own model for the JSON (registered under a fresh name, as open_clip users do)."""
    name = f"cf-test-{path.stem}-{next(_counter)}"
    target = path.with_name(f"{name}.json")
    target.write_text(path.read_text())
    open_clip.add_model_config(target)
    return open_clip.create_model(name).eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def feature_diff(oc: torch.nn.Module, model: torch.nn.Module, size: int, context: int) -> float:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, size, size, generator=g)
    tokens = torch.randint(1, 49000, (2, context), generator=g)
    tokens[:, 0], tokens[0, 5], tokens[1, context - 1] = 49406, 49407, 49407
    tokens[0, 6:] = 0
    with torch.no_grad():
        a = F.normalize(oc.encode_image(images), dim=-1) - model.encode_image(images, normalize=True)
        b = F.normalize(oc.encode_text(tokens), dim=-1) - model.encode_text(tokens, normalize=True)
    return max(a.abs().max().item(), b.abs().max().item())


@pytest.mark.parametrize("kind", sorted(OPEN_CLIP_JSONS))
def test_open_clip_json_builds_what_open_clip_builds(tmp_path, kind):
    path = write_json(tmp_path, OPEN_CLIP_JSONS[kind], f"{kind}.json")
    model = create_model(str(path)).eval()
    torch.manual_seed(0)
    oc = open_clip_from_json(path)
    assert n_params(model) == n_params(oc)
    model.load_state_dict(open_clip_to_clipforge(oc.state_dict()))
    cfg = model.config
    assert cfg.quick_gelu is bool(OPEN_CLIP_JSONS[kind].get("quick_gelu", False))
    assert feature_diff(oc, model, cfg.vision.image_size, cfg.text.context_length) < 1e-5
    assert get_tokenizer(str(path)).context_length == OPEN_CLIP_JSONS[kind]["text_cfg"]["context_length"]
    assert model.architecture == f"custom (from {kind}.json)"


def test_open_clips_shipped_vit_b_32_json_matches_open_clip():
    path = Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json"
    model = create_model(str(path)).eval()
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32").eval()
    assert n_params(model) == n_params(oc) > 100_000_000
    model.load_state_dict(open_clip_to_clipforge(oc.state_dict()))
    assert feature_diff(oc, model, 224, 77) < 1e-5
    assert model.architecture == "ViT-B-32"  # identical to the registered architecture, field for field
    quick = create_model(str(path.with_name("ViT-B-32-quickgelu.json")))
    assert quick.config.quick_gelu and quick.architecture == "ViT-B-32-quickgelu"


def test_clipforge_config_json_and_model_folder_config_load(tmp_path):
    cfg = get_model_config("tiny-vit").replace(embed_dim=40, text={"layers": 3})
    flat = write_json(tmp_path, cfg.to_dict(), "flat.json")
    assert create_model(str(flat)).config == cfg
    model = create_model(cfg)
    from clipforge.checkpoints.clipforge_format import save_pretrained

    save_pretrained(model, tmp_path / "folder")
    assert read_config_file(tmp_path / "folder" / "config.json") == cfg
    assert create_model(str(tmp_path / "folder" / "config.json")).config == cfg


def test_quickgelu_suffix_names_keep_working():
    model = create_model("tiny-vit-quickgelu")
    assert model.config.quick_gelu and model.architecture == "tiny-vit-quickgelu"


def test_json_of_neither_format_names_the_keys_found(tmp_path):
    path = write_json(tmp_path, {"embed_dim": 64, "towers": {}, "layers": 3})
    with pytest.raises(ConfigError) as err:
        create_model(str(path))
    message = str(err.value)
    assert str(path) in message and "['embed_dim', 'layers', 'towers']" in message


def test_unsupported_open_clip_field_is_refused_with_file_and_key(tmp_path):
    data = json.loads(json.dumps(OPEN_CLIP_JSONS["vit"]))
    data["vision_cfg"]["attentional_pool"] = "parallel"  # open_clip's WIP pooler (True, CoCa's, is supported)
    path = write_json(tmp_path, data)
    with pytest.raises(ConfigError, match=r"my-arch\.json: vision_cfg\.attentional_pool"):
        create_model(str(path))


def test_missing_and_broken_json_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        create_model(str(tmp_path / "absent.json"))
    (tmp_path / "broken.json").write_text('{"embed_dim": 64,')
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 1"):
        create_model(str(tmp_path / "broken.json"))


# --- naming ------------------------------------------------------------------------------------------
def test_names_never_claim_a_registered_architecture_the_config_differs_from():
    base = get_model_config("tiny-vit")
    near = base.replace(text={"context_length": 32})  # every shape in the old signature is equal
    assert architecture_name(base) == "tiny-vit"
    assert architecture_name(near, requested="tiny-vit") == "custom"
    assert architecture_name(near, source="/x/my-arch.json") == "custom (from my-arch.json)"
    name, exact = closest_architecture(near)
    assert name == "tiny-vit" and exact is False
    assert closest_architecture(base.replace(quick_gelu=True)) == ("tiny-vit-quickgelu", True)
    # Training-only fields do not change the architecture.
    assert same_architecture(base, base.replace(vision={"patch_dropout": 0.5}, init_logit_scale=1.0))


def test_model_source_rebuilds_from_the_recorded_config():
    cfg = get_model_config("tiny-vit").replace(embed_dim=32)
    assert model_source("tiny-vit", cfg.to_dict()) == cfg  # a stale or wrong name loses to the config
    assert model_source("tiny-vit", get_model_config("tiny-vit").to_dict()) == "tiny-vit"
    assert model_source("ViT-B-32", None) == "ViT-B-32"  # manifests written before configs were stored


# --- point 8: OpenAI-format checkpoints run with QuickGELU ----------------------------------------------
@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    from test_checkpoints import TINY_VIT, open_clip_tiny, trace_openai_style

    oc = open_clip_tiny(TINY_VIT, quick_gelu=True)
    folder = tmp_path_factory.mktemp("openai")
    archive = trace_openai_style(open_clip_tiny(TINY_VIT, quick_gelu=True), 32, folder / "ViT-tiny.pt")
    sd = dict(oc.state_dict())
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        sd[key] = torch.tensor(value)
    torch.save(sd, folder / "ViT-tiny-state-dict.pt")
    return oc, {"torchscript": archive, "state_dict": folder / "ViT-tiny-state-dict.pt"}


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_openai_checkpoint_under_explicit_name_gets_quickgelu(openai_files, fmt):
    oc, paths = openai_files
    model = create_model("tiny-vit", pretrained=str(paths[fmt])).eval()
    assert model.config.quick_gelu is True
    assert feature_diff(oc, model, 32, 77) < 1e-5
    assert model.architecture == "tiny-vit-quickgelu"
    gelu = create_model("tiny-vit", pretrained=str(paths[fmt]), quick_gelu=False).eval()
    assert gelu.config.quick_gelu is False and gelu.architecture == "tiny-vit"
    assert feature_diff(oc, gelu, 32, 77) > 1e-4  # the explicit override really runs GELU

"""Every named pretrained weight set clipforge knows: one row per (architecture, tag).

Generated once from open_clip 3.3's pretrained list by tools/gen_pretrained_table.py and checked
in (clipforge never imports open_clip). Rows give the Hub repository, the files to try in order,
QuickGELU, the preprocessing the weights were trained with (presets below), the input size where
it is not 224, the licence on the model card where known ("" = not recorded) and notes.
open_clip's ``<model>-quickgelu`` aliases are derived from the ``quick_gelu`` rows.
"""

from __future__ import annotations

from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Preprocessing presets (defaults: OpenAI mean/std, bicubic, resize the shortest side + crop).
INCEPTION_NORM: dict[str, Any] = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD}
SQUASH: dict[str, Any] = {"resize_mode": "squash"}
SIGLIP: dict[str, Any] = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "resize_mode": "squash"}
CLIPA: dict[str, Any] = {
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
PE: dict[str, Any] = {
    "mean": INCEPTION_MEAN,
    "std": INCEPTION_STD,
    "interpolation": "bilinear",
    "resize_mode": "squash",
}
MOBILECLIP: dict[str, Any] = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear"}
BILINEAR: dict[str, Any] = {"interpolation": "bilinear"}


# Provenance presets (licence as on the model card, where known).
OPENAI: dict[str, Any] = {"license": "mit", "notes": "OpenAI CLIP (WIT-400M)"}
OPEN_CLIP: dict[str, Any] = {"license": "mit"}
METACLIP: dict[str, Any] = {"license": "cc-by-nc-4.0", "notes": "MetaCLIP (Meta), QuickGELU"}
METACLIP2: dict[str, Any] = {"license": "cc-by-nc-4.0", "notes": "MetaCLIP 2 worldwide (multilingual)"}
DFN: dict[str, Any] = {
    "license": "apple-amlr",
    "notes": "Apple DFN (data filtering networks), converted from AXLearn",
}
MOBILECLIP_SRC: dict[str, Any] = {"license": "apple-amlr", "notes": "Apple MobileCLIP"}
MOBILECLIP2_SRC: dict[str, Any] = {"license": "apple-amlr", "notes": "Apple MobileCLIP2"}
SIGLIP_SRC: dict[str, Any] = {"license": "apache-2.0", "notes": "SigLIP (WebLI, big_vision), converted"}
SIGLIP2_SRC: dict[str, Any] = {"license": "apache-2.0", "notes": "SigLIP 2 (WebLI, big_vision), converted"}
EVA: dict[str, Any] = {"license": "mit", "notes": "EVA-CLIP (BAAI), converted"}
CLIPA_SRC: dict[str, Any] = {"license": "apache-2.0", "notes": "CLIPA-v2 (UCSC-VLAA)"}
NLLB: dict[str, Any] = {"notes": "NLLB-CLIP (NLLB text tower, 201 languages)"}
VITAMIN: dict[str, Any] = {"license": "mit", "notes": "ViTamin (DataComp-1B)"}
PE_SRC: dict[str, Any] = {"license": "apache-2.0", "notes": "Meta Perception Encoder (core), converted"}


def _row(model: str, tag: str, hf_hub: str, *presets: dict[str, Any], **facts: Any) -> dict[str, Any]:
    """One row: the presets' facts, then the row's own (which win)."""
    merged: dict[str, Any] = {}
    for preset in presets:
        merged.update(preset)
    return {"model": model, "tag": tag, "hf_hub": hf_hub, **merged, **facts}


def _same_name(tag: str, org: str, models: str, *presets: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of releases whose name says it all: Hub repository ``org/<model>``, the input size
    the name's last part when it is a number (else 224). ``models`` is space-separated."""
    rows = []
    for model in models.split():
        last = model.rsplit("-", 1)[-1]
        size = {"image_size": int(last)} if last.isdigit() else {}
        rows.append(_row(model, tag, f"{org}/{model}", *presets, **size))
    return rows


# fmt: off
ROWS: tuple[dict[str, Any], ...] = (
    # --- OpenAI ------------------------------------------------------------------------------------
    _row('RN50', 'openai', 'timm/resnet50_clip.openai', OPENAI, quick_gelu=True),
    _row('RN101', 'openai', 'timm/resnet101_clip.openai', OPENAI, quick_gelu=True),
    _row('RN50x4', 'openai', 'timm/resnet50x4_clip.openai', OPENAI, quick_gelu=True, image_size=288),
    _row('RN50x16', 'openai', 'timm/resnet50x16_clip.openai', OPENAI, quick_gelu=True, image_size=384),
    _row('RN50x64', 'openai', 'timm/resnet50x64_clip.openai', OPENAI, quick_gelu=True, image_size=448),
    _row('ViT-B-32', 'openai', 'timm/vit_base_patch32_clip_224.openai', OPENAI, quick_gelu=True),
    _row('ViT-B-16', 'openai', 'timm/vit_base_patch16_clip_224.openai', OPENAI, quick_gelu=True),
    _row('ViT-L-14', 'openai', 'timm/vit_large_patch14_clip_224.openai', OPENAI, quick_gelu=True),
    _row('ViT-L-14-336', 'openai', 'timm/vit_large_patch14_clip_336.openai', OPENAI, quick_gelu=True, image_size=336),
    # --- open_clip ---------------------------------------------------------------------------------
    _row('RN50', 'yfcc15m', 'timm/resnet50_clip.yfcc15m', OPEN_CLIP, quick_gelu=True),
    _row('RN50', 'cc12m', 'timm/resnet50_clip.cc12m', OPEN_CLIP, quick_gelu=True),
    _row('RN101', 'yfcc15m', 'timm/resnet101_clip.yfcc15m', OPEN_CLIP, quick_gelu=True),
    _row('ViT-B-32', 'laion400m_e31', 'timm/vit_base_patch32_clip_224.laion400m_e31', OPEN_CLIP, quick_gelu=True),
    _row('ViT-B-32', 'laion400m_e32', 'timm/vit_base_patch32_clip_224.laion400m_e32', OPEN_CLIP, quick_gelu=True),
    _row('ViT-B-32', 'laion2b_e16', 'timm/vit_base_patch32_clip_224.laion2b_e16', OPEN_CLIP),
    _row('ViT-B-32', 'laion2b_s34b_b79k', 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K', OPEN_CLIP),
    _row('ViT-B-32', 'datacomp_xl_s13b_b90k', 'laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K', OPEN_CLIP),
    _row('ViT-B-32', 'datacomp_m_s128m_b4k', 'laion/CLIP-ViT-B-32-DataComp.M-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_m_clip_s128m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.M.clip-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_m_laion_s128m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.M.laion-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_m_image_s128m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.M.image-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_m_text_s128m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.M.text-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_m_basic_s128m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.M.basic-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_m_s128m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.M-s128M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'datacomp_s_s13m_b4k', 'laion/CLIP-ViT-B-32-DataComp.S-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_s_clip_s13m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.S.clip-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_s_laion_s13m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.S.laion-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_s_image_s13m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.S.image-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_s_text_s13m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.S.text-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_s_basic_s13m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.S.basic-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32', 'commonpool_s_s13m_b4k', 'laion/CLIP-ViT-B-32-CommonPool.S-s13M-b4K', OPEN_CLIP),
    _row('ViT-B-32-256', 'datacomp_s34b_b86k', 'laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K', OPEN_CLIP, image_size=256),
    _row('ViT-B-16', 'laion400m_e31', 'timm/vit_base_patch16_clip_224.laion400m_e31', OPEN_CLIP),
    _row('ViT-B-16', 'laion400m_e32', 'timm/vit_base_patch16_clip_224.laion400m_e32', OPEN_CLIP),
    _row('ViT-B-16', 'laion2b_s34b_b88k', 'laion/CLIP-ViT-B-16-laion2B-s34B-b88K', OPEN_CLIP),
    _row('ViT-B-16', 'datacomp_xl_s13b_b90k', 'laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K', OPEN_CLIP),
    _row('ViT-B-16', 'datacomp_l_s1b_b8k', 'laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16', 'commonpool_l_clip_s1b_b8k', 'laion/CLIP-ViT-B-16-CommonPool.L.clip-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16', 'commonpool_l_laion_s1b_b8k', 'laion/CLIP-ViT-B-16-CommonPool.L.laion-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16', 'commonpool_l_image_s1b_b8k', 'laion/CLIP-ViT-B-16-CommonPool.L.image-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16', 'commonpool_l_text_s1b_b8k', 'laion/CLIP-ViT-B-16-CommonPool.L.text-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16', 'commonpool_l_basic_s1b_b8k', 'laion/CLIP-ViT-B-16-CommonPool.L.basic-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16', 'commonpool_l_s1b_b8k', 'laion/CLIP-ViT-B-16-CommonPool.L-s1B-b8K', OPEN_CLIP),
    _row('ViT-B-16-plus-240', 'laion400m_e31', 'timm/vit_base_patch16_plus_clip_240.laion400m_e31', OPEN_CLIP, image_size=240),
    _row('ViT-B-16-plus-240', 'laion400m_e32', 'timm/vit_base_patch16_plus_clip_240.laion400m_e31', OPEN_CLIP, image_size=240, notes="open_clip's Hub entry for e32 is the e31 repository"),
    _row('ViT-L-14', 'laion400m_e31', 'timm/vit_large_patch14_clip_224.laion400m_e31', OPEN_CLIP),
    _row('ViT-L-14', 'laion400m_e32', 'timm/vit_large_patch14_clip_224.laion400m_e32', OPEN_CLIP),
    _row('ViT-L-14', 'laion2b_s32b_b82k', 'laion/CLIP-ViT-L-14-laion2B-s32B-b82K', INCEPTION_NORM, OPEN_CLIP),
    _row('ViT-L-14', 'datacomp_xl_s13b_b90k', 'laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K', OPEN_CLIP),
    _row('ViT-L-14', 'commonpool_xl_clip_s13b_b90k', 'laion/CLIP-ViT-L-14-CommonPool.XL.clip-s13B-b90K', OPEN_CLIP),
    _row('ViT-L-14', 'commonpool_xl_laion_s13b_b90k', 'laion/CLIP-ViT-L-14-CommonPool.XL.laion-s13B-b90K', OPEN_CLIP),
    _row('ViT-L-14', 'commonpool_xl_s13b_b90k', 'laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K', OPEN_CLIP),
    _row('ViT-H-14', 'laion2b_s32b_b79k', 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K', OPEN_CLIP),
    _row('ViT-g-14', 'laion2b_s12b_b42k', 'laion/CLIP-ViT-g-14-laion2B-s12B-b42K', OPEN_CLIP),
    _row('ViT-g-14', 'laion2b_s34b_b88k', 'laion/CLIP-ViT-g-14-laion2B-s34B-b88K', OPEN_CLIP),
    _row('ViT-bigG-14', 'laion2b_s39b_b160k', 'laion/CLIP-ViT-bigG-14-laion2B-39B-b160k', OPEN_CLIP),
    # --- MetaCLIP ----------------------------------------------------------------------------------
    _row('ViT-B-32', 'metaclip_400m', 'timm/vit_base_patch32_clip_224.metaclip_400m', METACLIP, quick_gelu=True),
    _row('ViT-B-32', 'metaclip_fullcc', 'timm/vit_base_patch32_clip_224.metaclip_2pt5b', METACLIP, quick_gelu=True),
    _row('ViT-B-16', 'metaclip_400m', 'timm/vit_base_patch16_clip_224.metaclip_400m', METACLIP, quick_gelu=True),
    _row('ViT-B-16', 'metaclip_fullcc', 'timm/vit_base_patch16_clip_224.metaclip_2pt5b', METACLIP, quick_gelu=True),
    _row('ViT-L-14', 'metaclip_400m', 'timm/vit_large_patch14_clip_224.metaclip_400m', METACLIP, quick_gelu=True),
    _row('ViT-L-14', 'metaclip_fullcc', 'timm/vit_large_patch14_clip_224.metaclip_2pt5b', METACLIP, quick_gelu=True),
    _row('ViT-H-14', 'metaclip_fullcc', 'timm/vit_huge_patch14_clip_224.metaclip_2pt5b', METACLIP, quick_gelu=True),
    _row('ViT-H-14', 'metaclip_altogether', 'timm/vit_huge_patch14_clip_224.metaclip_altogether', METACLIP, notes='MetaCLIP Altogether; unlike the other MetaCLIP, not QuickGELU'),
    _row('ViT-bigG-14', 'metaclip_fullcc', 'timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b', METACLIP, quick_gelu=True),
    _row('ViT-H-14-worldwide', 'metaclip2_worldwide', 'timm/vit_huge_patch14_clip_224.metaclip2_worldwide', METACLIP2, quick_gelu=True),
    _row('ViT-H-14-worldwide-378', 'metaclip2_worldwide', 'timm/vit_huge_patch14_clip_378.metaclip2_worldwide', SQUASH, METACLIP2, image_size=378, notes='MetaCLIP 2 worldwide; not QuickGELU'),
    _row('ViT-bigG-14-worldwide', 'metaclip2_worldwide', 'timm/vit_gigantic_patch14_clip_224.metaclip2_worldwide', METACLIP2),
    _row('ViT-bigG-14-worldwide-378', 'metaclip2_worldwide', 'timm/vit_gigantic_patch14_clip_378.metaclip2_worldwide', SQUASH, METACLIP2, image_size=378, notes='MetaCLIP 2 worldwide; not QuickGELU'),
    # --- DFN ---------------------------------------------------------------------------------------
    _row('ViT-B-16', 'dfn2b', 'apple/DFN2B-CLIP-ViT-B-16', DFN, quick_gelu=True),
    _row('ViT-L-14', 'dfn2b', 'apple/DFN2B-CLIP-ViT-L-14', DFN, quick_gelu=True),
    _row('ViT-L-14', 'dfn2b_s39b', 'apple/DFN2B-CLIP-ViT-L-14-39B', DFN),
    _row('ViT-H-14', 'dfn5b', 'apple/DFN5B-CLIP-ViT-H-14', SQUASH, DFN, quick_gelu=True),
    _row('ViT-H-14-378', 'dfn5b', 'apple/DFN5B-CLIP-ViT-H-14-378', SQUASH, DFN, quick_gelu=True, image_size=378),
    # --- open_clip (ConvNeXt, RoBERTa towers) ------------------------------------------------------
    _row('roberta-ViT-B-32', 'laion2b_s12b_b32k', 'laion/CLIP-ViT-B-32-roberta-base-laion2B-s12B-b32k', OPEN_CLIP),
    _row('xlm-roberta-base-ViT-B-32', 'laion5b_s13b_b90k', 'laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k', OPEN_CLIP),
    _row('xlm-roberta-large-ViT-H-14', 'frozen_laion5b_s13b_b90k', 'laion/CLIP-ViT-H-14-frozen-xlm-roberta-large-laion5B-s13B-b90k', OPEN_CLIP),
    _row('convnext_base', 'laion400m_s13b_b51k', 'laion/CLIP-convnext_base-laion400M-s13B-b51K', OPEN_CLIP),
    _row('convnext_base_w', 'laion2b_s13b_b82k', 'laion/CLIP-convnext_base_w-laion2B-s13B-b82K', OPEN_CLIP, image_size=256),
    _row('convnext_base_w', 'laion2b_s13b_b82k_augreg', 'laion/CLIP-convnext_base_w-laion2B-s13B-b82K-augreg', OPEN_CLIP, image_size=256),
    _row('convnext_base_w', 'laion_aesthetic_s13b_b82k', 'laion/CLIP-convnext_base_w-laion_aesthetic-s13B-b82K', OPEN_CLIP, image_size=256),
    _row('convnext_base_w_320', 'laion_aesthetic_s13b_b82k', 'laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K', OPEN_CLIP, image_size=320),
    _row('convnext_base_w_320', 'laion_aesthetic_s13b_b82k_augreg', 'laion/CLIP-convnext_base_w_320-laion_aesthetic-s13B-b82K-augreg', OPEN_CLIP, image_size=320),
    _row('convnext_large_d', 'laion2b_s26b_b102k_augreg', 'laion/CLIP-convnext_large_d.laion2B-s26B-b102K-augreg', OPEN_CLIP, image_size=256),
    _row('convnext_large_d_320', 'laion2b_s29b_b131k_ft', 'laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft', OPEN_CLIP, image_size=320),
    _row('convnext_large_d_320', 'laion2b_s29b_b131k_ft_soup', 'laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup', OPEN_CLIP, image_size=320),
    _row('convnext_xxlarge', 'laion2b_s34b_b82k_augreg', 'laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg', OPEN_CLIP, image_size=256),
    _row('convnext_xxlarge', 'laion2b_s34b_b82k_augreg_rewind', 'laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-rewind', OPEN_CLIP, image_size=256),
    _row('convnext_xxlarge', 'laion2b_s34b_b82k_augreg_soup', 'laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup', OPEN_CLIP, image_size=256),
    # --- CoCa --------------------------------------------------------------------------------------
    _row('coca_ViT-B-32', 'laion2b_s13b_b90k', 'laion/CoCa-ViT-B-32-laion2B-s13B-b90k', OPEN_CLIP),
    _row('coca_ViT-B-32', 'mscoco_finetuned_laion2b_s13b_b90k', 'laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k', OPEN_CLIP, notes='fine-tuned for COCO captioning'),
    _row('coca_ViT-L-14', 'laion2b_s13b_b90k', 'laion/CoCa-ViT-L-14-laion2B-s13B-b90k', OPEN_CLIP),
    _row('coca_ViT-L-14', 'mscoco_finetuned_laion2b_s13b_b90k', 'laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k', OPEN_CLIP, notes='fine-tuned for COCO captioning'),
    # --- EVA ---------------------------------------------------------------------------------------
    _row('EVA01-g-14', 'laion400m_s11b_b41k', 'timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k', EVA),
    _row('EVA01-g-14-plus', 'merged2b_s11b_b114k', 'timm/eva_giant_patch14_plus_clip_224.merged2b_s11b_b114k', EVA),
    _row('EVA02-B-16', 'merged2b_s8b_b131k', 'timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k', EVA),
    _row('EVA02-L-14', 'merged2b_s4b_b131k', 'timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k', EVA),
    _row('EVA02-L-14-336', 'merged2b_s6b_b61k', 'timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k', EVA, image_size=336),
    _row('EVA02-E-14', 'laion2b_s4b_b115k', 'timm/eva02_enormous_patch14_clip_224.laion2b_s4b_b115k', EVA),
    _row('EVA02-E-14-plus', 'laion2b_s9b_b144k', 'timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k', EVA),
    # --- SigLIP ------------------------------------------------------------------------------------
    *_same_name('webli', 'timm', (
        'ViT-B-16-SigLIP ViT-B-16-SigLIP-256 ViT-B-16-SigLIP-i18n-256 ViT-B-16-SigLIP-384 '
        'ViT-B-16-SigLIP-512 ViT-L-16-SigLIP-256 ViT-L-16-SigLIP-384 ViT-SO400M-14-SigLIP '
        'ViT-SO400M-16-SigLIP-i18n-256'
    ), SIGLIP, SIGLIP_SRC),
    _row('ViT-SO400M-14-SigLIP-378', 'webli', 'timm/ViT-SO400M-14-SigLIP-384', SIGLIP, SIGLIP_SRC, image_size=378, notes='the SigLIP 384 release run at 378 (same 27x27 patch grid)'),
    _row('ViT-SO400M-14-SigLIP-384', 'webli', 'timm/ViT-SO400M-14-SigLIP-384', SIGLIP, SIGLIP_SRC, image_size=384),
    *_same_name('webli', 'timm', (
        'ViT-B-32-SigLIP2-256 ViT-B-16-SigLIP2 ViT-B-16-SigLIP2-256 ViT-B-16-SigLIP2-384 '
        'ViT-B-16-SigLIP2-512 ViT-L-16-SigLIP2-256 ViT-L-16-SigLIP2-384 ViT-L-16-SigLIP2-512 '
        'ViT-SO400M-14-SigLIP2 ViT-SO400M-14-SigLIP2-378 ViT-SO400M-16-SigLIP2-256 '
        'ViT-SO400M-16-SigLIP2-384 ViT-SO400M-16-SigLIP2-512 ViT-gopt-16-SigLIP2-256 '
        'ViT-gopt-16-SigLIP2-384'
    ), SIGLIP, SIGLIP2_SRC),
    # --- CLIPA -------------------------------------------------------------------------------------
    _row('ViT-L-14-CLIPA', 'datacomp1b', 'UCSC-VLAA/ViT-L-14-CLIPA-datacomp1B', CLIPA, CLIPA_SRC),
    _row('ViT-L-14-CLIPA-336', 'datacomp1b', 'UCSC-VLAA/ViT-L-14-CLIPA-336-datacomp1B', CLIPA, CLIPA_SRC, image_size=336),
    _row('ViT-H-14-CLIPA', 'datacomp1b', 'UCSC-VLAA/ViT-H-14-CLIPA-datacomp1B', CLIPA, CLIPA_SRC),
    _row('ViT-H-14-CLIPA-336', 'laion2b', 'UCSC-VLAA/ViT-H-14-CLIPA-336-laion2B', CLIPA, CLIPA_SRC, image_size=336),
    _row('ViT-H-14-CLIPA-336', 'datacomp1b', 'UCSC-VLAA/ViT-H-14-CLIPA-336-datacomp1B', CLIPA, CLIPA_SRC, image_size=336),
    _row('ViT-bigG-14-CLIPA', 'datacomp1b', 'UCSC-VLAA/ViT-bigG-14-CLIPA-datacomp1B', CLIPA, CLIPA_SRC),
    _row('ViT-bigG-14-CLIPA-336', 'datacomp1b', 'UCSC-VLAA/ViT-bigG-14-CLIPA-336-datacomp1B', CLIPA, CLIPA_SRC, image_size=336),
    # --- NLLB-CLIP ---------------------------------------------------------------------------------
    _row('nllb-clip-base', 'v1', 'visheratin/nllb-clip-base-oc', NLLB),
    _row('nllb-clip-large', 'v1', 'visheratin/nllb-clip-large-oc', NLLB),
    _row('nllb-clip-base-siglip', 'v1', 'visheratin/nllb-clip-base-siglip', SIGLIP, NLLB, image_size=384, license='cc-by-nc-4.0'),
    _row('nllb-clip-base-siglip', 'mrl', 'visheratin/nllb-siglip-mrl-base', SIGLIP, NLLB, image_size=384, license='mit'),
    _row('nllb-clip-large-siglip', 'v1', 'visheratin/nllb-clip-large-siglip', SIGLIP, NLLB, image_size=384),
    _row('nllb-clip-large-siglip', 'mrl', 'visheratin/nllb-siglip-mrl-large', SIGLIP, NLLB, image_size=384),
    # --- MobileCLIP --------------------------------------------------------------------------------
    _row('MobileCLIP-S1', 'datacompdr', 'apple/MobileCLIP-S1-OpenCLIP', MOBILECLIP, MOBILECLIP_SRC, image_size=256),
    _row('MobileCLIP-S2', 'datacompdr', 'apple/MobileCLIP-S2-OpenCLIP', MOBILECLIP, MOBILECLIP_SRC, image_size=256),
    _row('MobileCLIP-B', 'datacompdr', 'apple/MobileCLIP-B-OpenCLIP', MOBILECLIP, MOBILECLIP_SRC),
    _row('MobileCLIP-B', 'datacompdr_lt', 'apple/MobileCLIP-B-LT-OpenCLIP', MOBILECLIP, MOBILECLIP_SRC),
    _row('MobileCLIP2-B', 'dfndr2b', 'timm/MobileCLIP2-B-OpenCLIP', MOBILECLIP, MOBILECLIP2_SRC),
    _row('MobileCLIP2-S0', 'dfndr2b', 'timm/MobileCLIP2-S0-OpenCLIP', MOBILECLIP, MOBILECLIP2_SRC, image_size=256),
    _row('MobileCLIP2-S2', 'dfndr2b', 'timm/MobileCLIP2-S2-OpenCLIP', MOBILECLIP, MOBILECLIP2_SRC, image_size=256),
    _row('MobileCLIP2-S3', 'dfndr2b', 'timm/MobileCLIP2-S3-OpenCLIP', BILINEAR, MOBILECLIP2_SRC, image_size=256),
    _row('MobileCLIP2-S4', 'dfndr2b', 'timm/MobileCLIP2-S4-OpenCLIP', BILINEAR, MOBILECLIP2_SRC, image_size=256),
    _row('MobileCLIP2-L-14', 'dfndr2b', 'timm/MobileCLIP2-L-14-OpenCLIP', MOBILECLIP2_SRC),
    # --- ViTamin -----------------------------------------------------------------------------------
    _row('ViTamin-S', 'datacomp1b', 'jienengchen/ViTamin-S', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin')),
    _row('ViTamin-S-LTT', 'datacomp1b', 'jienengchen/ViTamin-S-LTT', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin')),
    _row('ViTamin-B', 'datacomp1b', 'jienengchen/ViTamin-B', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin')),
    _row('ViTamin-B-LTT', 'datacomp1b', 'jienengchen/ViTamin-B-LTT', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin')),
    _row('ViTamin-L', 'datacomp1b', 'jienengchen/ViTamin-L-224px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin')),
    _row('ViTamin-L-256', 'datacomp1b', 'jienengchen/ViTamin-L-256px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=256),
    _row('ViTamin-L-336', 'datacomp1b', 'jienengchen/ViTamin-L-336px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=336),
    _row('ViTamin-L-384', 'datacomp1b', 'jienengchen/ViTamin-L-384px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=384),
    _row('ViTamin-L2', 'datacomp1b', 'jienengchen/ViTamin-L2-224px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin')),
    _row('ViTamin-L2-256', 'datacomp1b', 'jienengchen/ViTamin-L2-256px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=256),
    _row('ViTamin-L2-336', 'datacomp1b', 'jienengchen/ViTamin-L2-336px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=336),
    _row('ViTamin-L2-384', 'datacomp1b', 'jienengchen/ViTamin-L2-384px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=384),
    _row('ViTamin-XL-256', 'datacomp1b', 'jienengchen/ViTamin-XL-256px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=256),
    _row('ViTamin-XL-336', 'datacomp1b', 'jienengchen/ViTamin-XL-336px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=336),
    _row('ViTamin-XL-384', 'datacomp1b', 'jienengchen/ViTamin-XL-384px', VITAMIN, filenames=('pytorch_model.safetensors', 'pytorch_model.bin'), image_size=256, notes="ViTamin 384px release; open_clip 3.3's config builds it at 256"),
    # --- Perception Encoder ------------------------------------------------------------------------
    _row('PE-Core-T-16-384', 'meta', 'timm/PE-Core-T-16-384', PE, PE_SRC, image_size=384),
    _row('PE-Core-S-16-384', 'meta', 'timm/PE-Core-S-16-384', PE, PE_SRC, image_size=384),
    _row('PE-Core-B-16', 'meta', 'timm/PE-Core-B-16', PE, PE_SRC),
    _row('PE-Core-L-14-336', 'meta', 'timm/PE-Core-L-14-336', PE, PE_SRC, image_size=336),
    _row('PE-Core-bigG-14-448', 'meta', 'timm/PE-Core-bigG-14-448', PE, PE_SRC, image_size=448),
)
# fmt: on

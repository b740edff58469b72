"""open_clip's own ``CoCa.generate``, run as a test oracle in a separate interpreter.

open_clip's generation needs Hugging Face's ``BeamSearchScorer``, which transformers 5 removed,
so this script runs with a transformers 4.x on ``PYTHONPATH`` (``.ci/run`` installs one under
``$VENV/oracles/transformers4``; see ``tests/test_coca.py``). Usage::

    python open_clip_coca_generate.py JOB.pt OUT.pt

``JOB.pt`` holds ``model_cfg`` (open_clip's config dict), ``weights`` (a path to an open_clip
state dict saved with ``torch.save``), ``images`` (a preprocessed batch) and ``runs`` (a list of
``(seed, generate kwargs)``). ``OUT.pt`` receives the list of generated token tensors.
"""

from __future__ import annotations

import sys

import torch


def main(job_path: str, out_path: str) -> None:
    import open_clip.coca_model as coca_model

    if not coca_model._has_transformers:
        raise SystemExit(
            "open_clip cannot import its transformers generation classes (needs transformers 4.x)"
        )
    job = torch.load(job_path, weights_only=False)
    cfg = job["model_cfg"]
    model = coca_model.CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
    model.load_state_dict(torch.load(job["weights"], weights_only=True))
    model.eval()
    outputs = []
    for seed, kwargs in job["runs"]:
        torch.manual_seed(seed)
        outputs.append(model.generate(job["images"], **kwargs))
    torch.save(outputs, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

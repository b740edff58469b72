"""Prompt templates for zero-shot classification.

A template is a plain ``str.format`` string with exactly one ``{}`` where the class name goes.
Strings (not lambdas) so they can be saved in results, read from a text file, and compared.

``IMAGENET_TEMPLATES`` is the set of 80 prompts OpenAI published with CLIP (the "Prompt
Engineering for ImageNet" notebook); ``SIMPLE_TEMPLATES`` is the 7-prompt subset the same notebook
found to recover most of the ensemble's gain at a tenth of the text-encoding cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from clipforge.errors import ConfigError

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

NAMED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "photo": ("a photo of a {}.",),
}

Template = str | Callable[[str], str]
TemplateSpec = str | os.PathLike | Sequence[Template]


def validate_template(template: str, where: str = "template") -> str:
    """A template must take the class name exactly once; anything else silently skews the
    class embedding (no name -> identical prompts for all classes; two names -> odd prompts)."""
    if not isinstance(template, str):
        raise ConfigError(f"{where}: template must be a string, got {type(template).__name__}")
    count = template.count("{}")
    if count != 1:
        raise ConfigError(f"{where}: template {template!r} must contain '{{}}' exactly once (found {count})")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise ConfigError(f"{where}: template {template!r} is not a valid format string ({e})") from e
    return template


def load_template_file(path: str | os.PathLike) -> list[str]:
    """One template per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read template file {path}: {e}") from e
    templates = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        templates.append(validate_template(text, where=f"{path}:{lineno}"))
    if not templates:
        raise ConfigError(f"template file {path} has no templates")
    return templates


def format_template(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


def resolve_templates(spec: TemplateSpec) -> list[Template]:
    """Turn a name ("imagenet", "simple", "photo"), a file path, or a list of templates into a
    validated list. Callables (open_clip's ``lambda c: f"a photo of a {c}."``) pass through."""
    if isinstance(spec, str | os.PathLike):
        key = os.fspath(spec)
        if key in NAMED_TEMPLATES:
            return list(NAMED_TEMPLATES[key])
        if Path(key).is_file():
            return load_template_file(key)
        if "{}" in key:  # a single inline template is a convenient shorthand
            return [validate_template(key)]
        names = ", ".join(NAMED_TEMPLATES)
        raise ConfigError(
            f"templates {key!r}: not a known set ({names}), an existing file, or a '{{}}' template"
        )
    templates = [
        t if callable(t) else validate_template(t, where=f"templates[{i}]") for i, t in enumerate(spec)
    ]
    if not templates:
        raise ConfigError("templates: empty list")
    return templates

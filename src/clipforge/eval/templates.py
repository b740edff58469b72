"""Prompt templates for zero-shot classification.

A template is a plain ``str.format`` string with exactly one placeholder where the class name
goes: ``{}`` (open_clip / clipforge) or ``{c}`` (CLIP_benchmark, whose files are read as they
are: ``zeroshot_classification_templates.txt``, one per line, and its JSON files keyed by dataset
name such as ``en_zeroshot_classification_templates.json`` / ``en_classnames.json``). Strings
(not lambdas) so they can be saved in results, read from a text file, and compared.

``IMAGENET_TEMPLATES`` is the set of 80 prompts OpenAI published with CLIP (the "Prompt
Engineering for ImageNet" notebook); ``SIMPLE_TEMPLATES`` is the 7-prompt subset the same notebook
found to recover most of the ensemble's gain at a tenth of the text-encoding cost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from clipforge.errors import ConfigError

PLACEHOLDERS = ("{}", "{c}")

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
    """A template must take the class name exactly once, as ``{}`` or as CLIP_benchmark's ``{c}``;
    anything else silently skews the class embedding (no name -> identical prompts for all
    classes; two names -> odd prompts)."""
    if not isinstance(template, str):
        raise ConfigError(f"{where}: template must be a string, got {type(template).__name__}")
    count = sum(template.count(p) for p in PLACEHOLDERS)
    if count != 1:
        raise ConfigError(
            f"{where}: template {template!r} must contain the class placeholder '{{}}' or '{{c}}' "
            f"exactly once (found {count})"
        )
    try:
        format_template(template, "x")
    except (IndexError, KeyError, ValueError) as e:
        raise ConfigError(f"{where}: template {template!r} is not a valid format string ({e})") from e
    return template


def load_template_file(path: str | os.PathLike, key: str | None = None) -> list[str]:
    """A ``.json`` file (see :func:`load_json_entry`), else one template per line; blank lines
    and lines starting with '#' are skipped. Errors name the file and line."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        entry, where = load_json_entry(path, key, fallback="imagenet1k")
        if isinstance(entry, dict):
            raise ConfigError(
                f"{where}: class-specific prompts (a dict of class -> prompts) are not supported; "
                "give a list of templates"
            )
        return [validate_template(t, where=f"{where}[{i}]") for i, t in enumerate(entry)]
    templates = []
    for lineno, line in enumerate(_read_lines(path, "template"), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        templates.append(validate_template(text, where=f"{path}:{lineno}"))
    if not templates:
        raise ConfigError(f"template file {path} has no templates")
    return templates


def load_classnames_file(path: str | os.PathLike, key: str | None = None) -> list[str]:
    """Class names: a ``.json`` file (a list, or CLIP_benchmark's dict keyed by dataset name),
    else ``classnames.txt``, one name per line, line i = class i. As in CLIP_benchmark every
    line is a class, so an interior blank line keeps later labels in place (and is refused,
    naming the line, since an empty name cannot be prompted); trailing blank lines are ignored."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        entry, where = load_json_entry(path, key)
        if not all(isinstance(n, str) and n.strip() for n in entry):
            raise ConfigError(f"{where}: class names must be non-empty strings")
        return [n.strip() for n in entry]
    lines = [line.strip() for line in _read_lines(path, "class names")]
    while lines and not lines[-1]:
        lines.pop()
    for lineno, name in enumerate(lines, start=1):
        if not name:
            raise ConfigError(f"{path}:{lineno}: empty class name (line {lineno} is class {lineno - 1})")
    if not lines:
        raise ConfigError(f"class names file {path} is empty")
    return lines


def load_json_entry(
    path: Path, key: str | None = None, fallback: str | None = None
) -> tuple[list | dict, str]:
    """A JSON list as it is, or from a dict keyed by dataset name (CLIP_benchmark's files) the
    entry for ``key`` (else ``fallback``: CLIP_benchmark falls back to "imagenet1k" templates
    for a dataset it has none for); without a key, the only entry. Returns (entry, where)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if isinstance(data, list):
        return data, str(path)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a list, or a dict keyed by dataset name")
    for k in _lookup_keys(key) + ([fallback] if fallback and key else []):
        if k in data:
            return _as_entry(data[k], f"{path}[{k!r}]"), f"{path}[{k!r}]"
    if key is None and len(data) == 1:
        ((k, v),) = data.items()
        return _as_entry(v, f"{path}[{k!r}]"), f"{path}[{k!r}]"
    shown = ", ".join(sorted(data)[:12]) + (" ..." if len(data) > 12 else "")
    hint = f"no entry {key!r}" if key else "several datasets and no key"
    raise ConfigError(f"{path}: {hint}; pick one with FILE.json:NAME (available: {shown})")


def _lookup_keys(key: str | None) -> list[str]:
    """CLIP_benchmark looks up ``wds/vtab/cifar10`` as itself and as ``vtab/cifar10``; its
    Hugging Face webdataset repos are named ``wds_<name>``."""
    if not key:
        return []
    keys = [key]
    if "/" in key:
        keys.append(key.split("/", 1)[1])
    if key.startswith("wds_"):
        keys += [key[4:], key[4:].replace("-", "/")]
    return list(dict.fromkeys(keys))


def _as_entry(value: object, where: str) -> list | dict:
    if isinstance(value, list | dict) and value:
        return value
    raise ConfigError(f"{where}: expected a non-empty list")


def split_file_key(spec: str) -> tuple[str, str | None]:
    """``FILE.json:NAME`` -> (FILE.json, NAME); anything else is a plain path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".json") and not Path(spec).exists():
        return head, tail
    return spec, None


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {path}: {e}") from e


def format_template(template: Template, classname: str) -> str:
    """``{c}`` templates are CLIP_benchmark's (``template.format(c=name)``), ``{}`` ours."""
    if callable(template):
        return template(classname)
    return template.format(c=classname) if "{c}" in template else template.format(classname)


def resolve_templates(spec: TemplateSpec) -> list[Template]:
    """Turn a name ("imagenet", "simple", "photo"), a file path, or a list of templates into a
    validated list. Callables (open_clip's ``lambda c: f"a photo of a {c}."``) pass through."""
    if isinstance(spec, str | os.PathLike):
        key = os.fspath(spec)
        if key in NAMED_TEMPLATES:
            return list(NAMED_TEMPLATES[key])
        file, entry = split_file_key(key)
        if Path(file).is_file():
            return load_template_file(file, entry)
        if any(p in key for p in PLACEHOLDERS):  # a single inline template is a convenient shorthand
            return [validate_template(key)]
        names = ", ".join(NAMED_TEMPLATES)
        raise ConfigError(
            f"templates {key!r}: not a known set ({names}), an existing file, or a '{{}}'/'{{c}}' template"
        )
    templates = [
        t if callable(t) else validate_template(t, where=f"templates[{i}]") for i, t in enumerate(spec)
    ]
    if not templates:
        raise ConfigError("templates: empty list")
    return templates

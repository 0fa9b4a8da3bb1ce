"""Prompt templates that turn a class name into texts (zero-shot evaluation, UniCL prompts).

Template sets are data files in `templates/<name>.json`, each a JSON list of format strings
with one `{}` for the class name:

- `imagenet80`: the 80 ImageNet prompts of CLIP (Radford et al. 2021, "Prompt engineering
  and ensembling"), e.g. "a bad photo of a {}.".
- `imagenet7`: the 7-prompt subset SLIP uses for ImageNet zero-shot ("itap of a {}.", ...).
- `simple`: the single prompt "a photo of a {}.".
- `emoji`: six prompts for emoji and clip art ("an emoji of {}.", "a {} emoji.", the bare
  name, "an icon of {}.", ...), the zero-shot set of the embedded emoji evaluations.
- `fashion`: six prompts for Fashion-MNIST's 28 px grayscale product photos ("a black and
  white photo of a {}.", "a low resolution photo of a {}.", ...).

`load_templates` also accepts a path to such a JSON file, so a dataset can bring its own set.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")


def available_templates() -> list[str]:
    """Names of the bundled template sets."""
    return sorted(f[:-5] for f in os.listdir(TEMPLATE_DIR) if f.endswith(".json"))


@functools.cache
def _load(path: str) -> tuple[str, ...]:
    with open(path) as f:
        templates = json.load(f)
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{path}: expected a non-empty JSON list of template strings")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"{path}: template {t!r} must be a string with exactly one '{{}}'")
    return tuple(templates)


def load_templates(name: str) -> list[str]:
    """The template list called `name` (a bundled set) or stored at `name` (a .json path)."""
    if name.endswith(".json") or os.sep in name:
        path = name
    else:
        path = os.path.join(TEMPLATE_DIR, f"{name}.json")
        if not os.path.exists(path):
            raise ValueError(
                f"unknown prompt template set {name!r}; bundled: {available_templates()} "
                "(or give a path to a JSON list)"
            )
    return list(_load(path))


def prompts_for(classname: str | Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with the class name; a list of synonyms gives every
    template x synonym (template-major), as SLIP's zero-shot evaluation does."""
    names = [classname] if isinstance(classname, str) else list(classname)
    if not names:
        raise ValueError("prompts_for: empty list of class names")
    return [t.format(n) for t in templates for n in names]

"""Zero-shot classification with prompt ensembles (CLIP's and SLIP's protocol).

A class embedding is the mean of the L2-normalised text embeddings of every (template x
synonym) prompt for that class, L2-normalised again. Images are scored by `img @ cls.T`
without a logit scale (it does not change the ranking). Reported: top-1, top-5 and mean
per-class accuracy (the metric SLIP uses for aircraft, pets, caltech101 and flowers).

`label_map` turns a fine-grained label set into a coarse one: a JSON {"groups": [names],
"group_of_label": [group index per class]} (the emoji shards' `emoji-groups.json`) replaces
each record's label by its class's group and makes the group names the zero-shot classes,
so the same shards give a 99-subgroup and a 9-group task. (The common `groups` key only
colours plots and is not part of the cache key; `label_map` changes the task, and is.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from input_pipeline.templates import load_templates, prompts_for
from mmssl_jax.evaluation import context
from mmssl_jax.evaluation.encoder import l2_normalize

ClassName = str | Sequence[str]  # one name, or a list of synonyms


def default_prompts(classname: str, templates: Sequence[str]) -> list[str]:
    """Fills "{}" in every template with `classname`."""
    return [t.replace("{}", classname) for t in templates]


def class_prompts(
    classname: ClassName,
    templates: Sequence[str],
    prompts_for: Callable[[str, Sequence[str]], list[str]] = default_prompts,
) -> list[str]:
    """Every (synonym x template) prompt for one class."""
    names = [classname] if isinstance(classname, str) else list(classname)
    if not names:
        raise ValueError("a class needs at least one name")
    return [p for name in names for p in prompts_for(name, templates)]


def class_embeddings(
    embed_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[ClassName],
    templates: Sequence[str],
    prompts_for: Callable[[str, Sequence[str]], list[str]] = default_prompts,
) -> np.ndarray:
    """[C, D] class embeddings: mean of L2-normalised prompt embeddings, renormalised.

    All prompts go to `embed_texts` in one call so a batched encoder sees full batches.
    """
    prompts = [class_prompts(c, templates, prompts_for) for c in classnames]
    flat = [p for ps in prompts for p in ps]
    emb = l2_normalize(np.asarray(embed_texts(flat)))
    bounds = np.cumsum([0] + [len(ps) for ps in prompts])
    means = np.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    return l2_normalize(means)


class ZeroShotResult(NamedTuple):
    metrics: dict[str, float]  # top1, top5, mean_per_class
    predictions: np.ndarray  # int [N], argmax class
    logits: np.ndarray  # float [N, C]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the label is among the k highest logits (ties go to the lower index)."""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def mean_per_class_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over the classes present in `labels` of each class's accuracy (recall)."""
    classes = np.unique(labels)
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in classes]))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int [C, C]; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def evaluate(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> ZeroShotResult:
    """Zero-shot metrics for L2-normalised image embeddings [N, D] against [C, D] classes."""
    labels = np.asarray(labels)
    num_classes = class_emb.shape[0]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"zero-shot labels must lie in [0, {num_classes}); got [{labels.min()}, "
            f"{labels.max()}] (are the classnames those of this shard set?)"
        )
    logits = l2_normalize(image_emb) @ class_emb.T
    predictions = np.argmax(logits, axis=1)
    metrics = {
        "top1": float(np.mean(topk_correct(logits, labels, 1))),
        "top5": float(np.mean(topk_correct(logits, labels, 5))),
        "mean_per_class": mean_per_class_accuracy(labels, predictions),
    }
    return ZeroShotResult(metrics, predictions, logits)


def map_labels(
    labels: np.ndarray, classnames: Sequence[ClassName], label_map: str | None
) -> tuple[np.ndarray, list]:
    """(labels, class names) of the task: unchanged without `label_map`, else every label
    replaced by its group (a JSON {"groups", "group_of_label"}) and the groups as classes."""
    labels = np.asarray(labels)
    if not label_map:
        return labels, list(classnames)
    names, group_of = context.load_groups(label_map)
    if len(group_of) != len(classnames):
        raise ValueError(
            f"{label_map}: group_of_label has {len(group_of)} entries for {len(classnames)} "
            "classes (is it the groups file of these class names?)"
        )
    return np.asarray(group_of, np.int64)[labels], names


# ---- the evaluator entry (type "zero_shot", found by name: see runner.py) ----

DEFAULTS = dict(shards=None, templates="simple", label_map=None)
SPLITS = ("shards",)  # the shard keys it reads
NEEDS_TEXT = True  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = True  # whether the raw-pixel baseline applies
TSNE = True  # t-SNE map by default
PER_LAYER = False  # metrics are "<layer>/<metric>" rows
CONCURRENT = True  # device work only through call.features / call.texts


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""
    arrays = context.load_arrays(name, cfg, "shards")
    keep = context.need_labels(name, "shards", arrays)
    feats = call.features(encoder, arrays, cfg, f"{name} images")
    if "emb" not in feats:
        raise ValueError(f"evals.{name}: zero-shot needs the encoder's 'emb' output")
    labels, classnames = map_labels(
        np.asarray(arrays["label"])[keep],
        context.load_classnames(cfg["classnames"]),
        cfg["label_map"],
    )
    templates = load_templates(cfg["templates"])
    class_emb = class_embeddings(
        lambda texts: call.texts(encoder, texts, cfg, ("classes", tuple(texts))),
        classnames,
        templates,
        prompts_for,
    )
    result = evaluate(feats["emb"][keep], class_emb, labels)
    if artifacts and call.write and cfg["plots"]:
        from mmssl_jax.evaluation import plots

        cm = confusion_matrix(labels, result.predictions, len(classnames))
        context.draw(
            call,
            name,
            "confusion matrix",
            lambda: plots.plot_confusion_matrix(
                cm,
                classnames,
                call.plot_path(name, "confusion"),
                title=f"{name}: zero-shot confusion (step {call.step})",
            ),
        )
        names = classnames if cfg["label_map"] else None  # the plot labels of the task
        context.tsne(call, name, cfg, feats["emb"][keep], labels, names=names)
    return result.metrics

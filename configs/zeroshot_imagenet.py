"""ImageNet-1k zero-shot evaluation of a trained model, on the user's own validation set.

    python -m mmssl_jax.main --mode=eval --workdir=WORKDIR \\
        --config=configs/zeroshot_imagenet.py:method=slip,size=vitb,val=DIR/imagenet-val-*.tfrecord

`method` and `size` name the recipe the workdir was trained with (its model and data come
from configs/common.py, as in configs/<method>_<size>.py; `data=` points at its data root
as there). `val` is a glob of labelled shards in the standard ImageNet-1k label order
(sorted WordNet ids, what tfds `imagenet2012` and an ImageFolder of n0*/ folders give):

    python tools/make_shards.py folder --images_dir imagenet/val --split val \\
        --output DIR/imagenet               # val/n01440764/*.JPEG ... (1,000 folders)
    python tools/make_shards.py tfds --name imagenet2012 --split validation \\
        --data_dir ~/tensorflow_datasets --output DIR/imagenet

Class names are CLIP's cleaned ImageNet names (input_pipeline/templates/classnames/
imagenet1k.json); `templates` is `imagenet80` (CLIP's 80 prompts, the default) or
`imagenet7` (the 7 SLIP reports) or a JSON path. `limit=N` evaluates the first N images.
"""

from __future__ import annotations

import glob
import json
import os

from configs.common import DATA_ROOT, parse_arg, recipe
from input_pipeline import templates

CLASSNAMES_DIR = os.path.join(os.path.dirname(templates.__file__), "templates", "classnames")
IMAGENET_CLASSNAMES = os.path.join(CLASSNAMES_DIR, "imagenet1k.json")
IMAGENET_WNIDS = os.path.join(CLASSNAMES_DIR, "imagenet1k_wnids.json")


def check_label_order(val: str) -> None:
    """Fails when the shards' class-name sidecar (written by make_shards folder/tfds) is not
    the 1,000 WordNet ids in standard order: the labels would then index the wrong names."""
    found = sorted(glob.glob(os.path.join(os.path.dirname(val), "*-classnames.json")))
    if not found:
        return
    with open(IMAGENET_WNIDS, encoding="utf-8") as f:
        wnids = json.load(f)
    for path in found:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
        if names != wnids and all(isinstance(n, str) and n[:1] == "n" for n in names):
            raise ValueError(
                f"{path}: {len(names)} classes that are not the 1,000 ImageNet WordNet ids in "
                "sorted order, so labels would not match CLIP's class names (is the folder "
                "missing classes?)"
            )


def imagenet_zero_shot(
    shards: str, templates: str = "imagenet80", image_size: int = 224, limit: int = 0
) -> dict:
    """The eval entry: top-1/top-5/mean-per-class over CLIP's 1,000 class names."""
    entry = dict(
        type="zero_shot",
        shards=shards,
        classnames=IMAGENET_CLASSNAMES,
        templates=templates,
        image_size=image_size,
        baselines=False,  # a raw-pixel probe is meaningless for zero-shot over 1,000 names
        tsne=False,
    )
    if limit > 0:
        entry["limit"] = limit
    return entry


def get_config(arg: str | None = None):
    args = parse_arg(
        arg,
        method="clip",
        size="vitb",
        data=DATA_ROOT,
        val=f"{DATA_ROOT}/imagenet/imagenet-val-*.tfrecord",
        templates="imagenet80",
        limit=0,
    )
    check_label_order(args.val)
    config = recipe(args.method, args.size, f"data={args.data}")
    image_size = config.data.image_size
    config.evals = {
        "imagenet_zero_shot": imagenet_zero_shot(args.val, args.templates, image_size, args.limit)
    }
    return config

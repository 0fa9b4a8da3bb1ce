"""Fine-tune a pretrained (exported, converted or trained) model on a labelled shard set.

    python -m mmssl_jax.main --workdir=FT --config=configs/finetune_vitb.py:init=EXPORT_DIR,\\
train=DIR/task-train-*.tfrecord,test=DIR/task-test-*.tfrecord,classnames=DIR/task-classnames.json

The recipe is "fine-tune like you pretrain" (FLYP, Goyal et al. 2023): the contrastive
image-text loss over class prompts (UniCL, so images of one class share their target), which
keeps the model a zero-shot classifier and fine-tunes both towers; AdamW lr 1e-5, wd 0.1,
500 warmup steps, cosine to 0, gradient clipping at 1. The training controls are the
parameter rules of config.optim (mmssl_jax/training/param_rules.py):

    freeze=image|text   lock that tower (LiT-style); open_blocks=K leaves its last K blocks open
    layer_decay=0.65    layer-wise lr decay in both towers

`init` is an export directory (tools/export.py, tools/convert_torch.py: its model config and
tokenizer are used), a .safetensors file or a training workdir (then `method`/`size` give
the model). Evaluations: zero-shot accuracy on the task's test shards (the fine-tuned
model), and ImageNet zero-shot when `imagenet=` names validation shards. Trade the two off
after training with WiSE-FT (`python tools/wise_ft.py ... --alpha=0.5`).
"""

from __future__ import annotations

import json
import os

import ml_collections

from configs.common import DATA_ROOT, SIZES, parse_arg, recipe
from mmssl_jax.training import param_rules

# (file name, what it sets) of an export directory (mmssl_jax/export/).
EXPORT_MODEL = "model.json"
# The export's tokenizer: sentencepiece, a BERT tower's tokenizer.json or CLIP's BPE merges.
EXPORT_TOKENIZERS = ("tokenizer.model", "tokenizer.json", "bpe_merges.txt.gz", "bpe_merges.txt")


def task_eval(shards: str, classnames: str, templates: str, image_size: int) -> dict:
    return dict(
        type="zero_shot",
        shards=shards,
        classnames=classnames,
        templates=templates,
        image_size=image_size,
        baselines=False,
        tsne=False,
    )


def use_export(config: ml_collections.ConfigDict, init: str) -> None:
    """Takes the model config, text length and tokenizer from an export directory."""
    path = os.path.join(init, EXPORT_MODEL)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    config.model = ml_collections.ConfigDict(meta["model"])
    if meta.get("text_length"):
        config.model.context_length = int(meta["text_length"])
        config.data.text_length = int(meta["text_length"])
    for name in EXPORT_TOKENIZERS:
        if os.path.isfile(os.path.join(init, name)):
            config.data.tokenizer = os.path.join(init, name)
            break


def freeze_rules(which: str, depth: int, unlock: int) -> tuple:
    """LiT-style lock of one tower ("image", "text", "none"), its last `unlock` blocks open."""
    if which == "none":
        return ()
    towers = {"image": "image_encoder", "text": "text_encoder"}
    if which not in towers:
        raise ValueError(f"freeze={which!r}; valid: none, image, text")
    return tuple(param_rules.lock_tower(towers[which], depth=depth, unlocked_last=unlock))


def finetune_recipe(size: str, arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """The fine-tuning config for model `size`; `defaults` are this size's arg defaults."""
    base = dict(
        init="",
        method="clip",
        data=DATA_ROOT,
        train="",
        test="",
        classnames="",
        templates="imagenet80",
        imagenet="",
        freeze="none",
        open_blocks=0,
        layer_decay=0.0,
        lr=1e-5,
        batch=512,
        epochs=10.0,
        warmup=500,
    )
    base.update(defaults)
    args = parse_arg(arg, **base)
    for key in ("init", "train", "test", "classnames"):
        if not args[key]:
            raise ValueError(f"{size} fine-tuning needs `{key}=` in the config arg")
    config = recipe(args.method, size, f"data={args.data}")
    use_export(config, args.init)
    config.objectives = [("unicl", 1.0)]
    config.data.sources = ml_collections.ConfigDict(
        dict(
            task=dict(
                shards=args.train,
                weight=1.0,
                classnames=args.classnames,
                use_labels=True,
                prompt_templates=args.templates,
            )
        )
    )
    config.init_from.path = args.init
    depth = _depth(config, args.freeze)
    config.optim.update(
        dict(
            lr=args.lr,
            weight_decay=0.1,
            warmup_steps=args.warmup,
            start_lr=0.0,
            end_lr=0.0,
            grad_clip_norm=1.0,
            freeze=freeze_rules(args.freeze, depth, args.open_blocks),
            layer_decay=args.layer_decay,
        )
    )
    config.train.update(dict(batch_size=args.batch, epochs=args.epochs))
    size_px = config.data.image_size
    evals = {"task_zero_shot": task_eval(args.test, args.classnames, args.templates, size_px)}
    if args.imagenet:
        from configs.zeroshot_imagenet import imagenet_zero_shot

        evals["imagenet_zero_shot"] = imagenet_zero_shot(args.imagenet, "imagenet80", size_px)
    config.evals = ml_collections.ConfigDict(evals)
    return config


def _depth(config: ml_collections.ConfigDict, which: str) -> int:
    """Blocks of the tower to lock, from the model table (and the config's overrides)."""
    from mmssl_jax.models.registry import IMAGE_ENCODERS, TEXT_ENCODERS

    if which == "image":
        name, key, overrides = config.model.image_encoder, "depth", "image_overrides"
        table = IMAGE_ENCODERS
    elif which == "text":
        name, key, overrides = config.model.text_encoder, "layers", "text_overrides"
        table = TEXT_ENCODERS
    else:
        return 0
    return int((config.model.get(overrides) or {}).get(key, table[name][1].get(key, 0)))


def get_config(arg=None):
    assert "vitb" in SIZES
    return finetune_recipe("vitb", arg)

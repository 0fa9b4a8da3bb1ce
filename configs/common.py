"""Shared config builder: one recipe table (SLIP's published settings) and one size table.

Every `configs/<method>_<size>.py` is `get_config(arg) = recipe(method, size, arg)`; nothing is
copied between files. `arg` is an optional "key=value,key=value" string, e.g.
`--config=configs/slip_vits.py:data=embedded`.
"""

from __future__ import annotations

import os

import ml_collections

# SLIP's README: the same lr/wd for every size within a method; AdamW (0.9, 0.98), eps 1e-8,
# 1 warmup epoch from 1e-6, cosine to 1e-5, global batch 4096, 25 epochs.
RECIPES = {
    "clip": dict(objectives=[("clip", 1.0)], lr=5e-4, weight_decay=0.5),
    "simclr": dict(objectives=[("simclr", 1.0)], lr=3.2e-3, weight_decay=0.1),
    "slip": dict(objectives=[("clip", 1.0), ("simclr", 1.0)], lr=3e-3, weight_decay=0.1),
    "unicl": dict(objectives=[("unicl", 1.0)], lr=5e-4, weight_decay=0.5),
    "siglip": dict(objectives=[("siglip", 1.0)], lr=5e-4, weight_decay=0.5),
}

# Image tower name in mmssl_jax.models.registry for each size; the text tower is CLIP's.
SIZES = {
    "vits": dict(image_encoder="vit_s16", text_encoder="clip_text", image_size=224),
    "vitb": dict(image_encoder="vit_b16", text_encoder="clip_text", image_size=224),
    "vitl": dict(image_encoder="vit_l16", text_encoder="clip_text", image_size=224),
    "rn50": dict(image_encoder="resnet50", text_encoder="clip_text", image_size=224),
    "tiny": dict(image_encoder="vit_tiny", text_encoder="text_tiny", image_size=32),
}

DATA_ROOT = os.environ.get("MMSSL_DATA", "data")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses "k=v,k=v" into a ConfigDict, typed by the defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; valid: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def embedded_sources(root: str = DATA_ROOT, fashion_weight: float = 0.0) -> dict:
    """The embedded default: emoji image-text pairs (+ optionally Fashion-MNIST labels)."""
    sources = {
        "emoji": dict(
            shards=f"{root}/emoji/emoji-train-*.tfrecord",
            weight=1.0,
            classnames=f"{root}/emoji/emoji-classnames.json",
            use_labels=False,
            prompt_templates="simple",
        )
    }
    if fashion_weight > 0:
        sources["fashion_mnist"] = dict(
            shards=f"{root}/fashion_mnist/fashion_mnist-train-*.tfrecord",
            weight=fashion_weight,
            classnames=f"{root}/fashion_mnist/fashion_mnist-classnames.json",
            use_labels=True,
            prompt_templates="imagenet80",
        )
    return sources


def embedded_evals(root: str = DATA_ROOT, image_size: int = 32) -> dict:
    """Zero-shot on held-out emoji, Fashion-MNIST linear probe, emoji retrieval."""
    emoji_test = f"{root}/emoji/emoji-test-*.tfrecord"
    emoji_names = f"{root}/emoji/emoji-classnames.json"
    return {
        "emoji_zero_shot": dict(
            type="zero_shot",
            shards=emoji_test,
            classnames=emoji_names,
            templates="simple",
            image_size=image_size,
        ),
        "emoji_retrieval": dict(type="retrieval", shards=emoji_test, image_size=image_size),
        "fashion_linear_probe": dict(
            type="linear_probe",
            train_shards=f"{root}/fashion_mnist/fashion_mnist-train-*.tfrecord",
            test_shards=f"{root}/fashion_mnist/fashion_mnist-test-*.tfrecord",
            image_size=image_size,
            train_limit=10000,
            test_limit=2000,
        ),
    }


def recipe(method: str, size: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The full config for `method` x `size`."""
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; valid: {sorted(RECIPES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {sorted(SIZES)}")
    r, s = RECIPES[method], SIZES[size]
    tiny = size == "tiny"
    # UniCL mixes image-label data (Fashion-MNIST) into the image-text stream by default.
    args = parse_arg(arg, data=DATA_ROOT, fashion=0.5 if method == "unicl" else 0.0)
    needs_text = any(name != "simclr" for name, _ in r["objectives"])
    needs_ssl_head = any(name == "simclr" for name, _ in r["objectives"])

    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(
        dict(
            image_encoder=s["image_encoder"],
            text_encoder=s["text_encoder"] if needs_text else None,
            embed_dim=128 if tiny else 512,
            # SLIP's SimCLR MLP: width -> 4096 -> 4096 -> 256 with BatchNorm. The tiny config
            # uses LayerNorm: BatchNorm collapses at small batch (SLIP issues #7, #30).
            ssl_head=(
                dict(hidden=512, out=128, norm="layer")
                if tiny
                else dict(hidden=4096, out=256, norm="batch")
            )
            if needs_ssl_head
            else None,
            vocab_size=-1,  # -1: read from the tokenizer
            context_length=32 if tiny else 77,
            dtype="float32",
            remat=False,
        )
    )
    config.objectives = list(r["objectives"])
    config.objective_options = ml_collections.ConfigDict(
        dict(simclr=dict(temperature=0.1), supcon=dict(temperature=0.1))
    )

    config.data = ml_collections.ConfigDict(
        dict(
            sources=embedded_sources(args.data, args.fashion),
            tokenizer=f"{args.data}/tokenizer/spm.model",
            image_size=s["image_size"],
            text_length=32 if tiny else 77,
            clip_scale=(0.5, 1.0),
            ssl_scale=(0.08, 1.0),
            flip=True,
            seed=0,
            num_workers=0 if tiny else 8,  # grain worker processes
            num_threads=2 if tiny else 16,  # decode threads per process or worker
            prefetch_batches=2,
            skip_bad_records=False,
            shuffle=True,
        )
    )
    config.augment = ml_collections.ConfigDict(
        dict(
            jitter_prob=0.8,
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
            grayscale_prob=0.2,
            blur_prob=0.5,
            blur_sigma=(0.1, 2.0),
            solarize_prob=0.0,  # MoCo v3's asymmetric recipe uses 0.2 on one view
        )
    )

    config.optim = ml_collections.ConfigDict(
        dict(
            lr=r["lr"],
            weight_decay=r["weight_decay"],
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            warmup_epochs=1.0,
            warmup_steps=-1,
            start_lr=1e-6,
            end_lr=1e-5,
            grad_clip_norm=0.0,
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=256 if tiny else 4096,
            epochs=25.0,
            total_steps=-1,  # > 0 overrides epochs
            grad_accum=1,
            log_every=10 if tiny else 50,
            ckpt_every=200 if tiny else 1000,
            keep_ckpts=3,
            eval_every=-1,  # -1: evaluate at the end only
            max_bad_steps=10,
            num_devices=-1,  # -1: all devices
            progress=True,
        )
    )
    config.evals = ml_collections.ConfigDict(embedded_evals(args.data, s["image_size"]))
    return config

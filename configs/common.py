"""Shared config builder: one recipe table (SLIP's published settings) and one size table.

Every `configs/<method>_<size>.py` is `get_config(arg) = recipe(method, size, arg)`; nothing is
copied between files. `arg` is an optional "key=value,key=value" string, e.g.
`--config=configs/slip_vits.py:data=embedded`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence

import ml_collections

from mmssl_jax.config_utils import import_extensions
from mmssl_jax.models.extra_heads import head_names
from mmssl_jax.objectives import model_parts
from mmssl_jax.training.param_rules import SLIP_WD_RULES, lock_tower

# SLIP's README: the same lr/wd for every size within a method; AdamW (0.9, 0.98), eps 1e-8,
# 1 warmup epoch from 1e-6, cosine to 1e-5, global batch 4096, 25 epochs.
RECIPES = {
    "clip": dict(objectives=[("clip", 1.0)], lr=5e-4, weight_decay=0.5),
    "simclr": dict(objectives=[("simclr", 1.0)], lr=3.2e-3, weight_decay=0.1),
    "slip": dict(objectives=[("clip", 1.0), ("simclr", 1.0)], lr=3e-3, weight_decay=0.1),
    "unicl": dict(objectives=[("unicl", 1.0)], lr=5e-4, weight_decay=0.5),
    "siglip": dict(objectives=[("siglip", 1.0)], lr=5e-4, weight_decay=0.5),
    # Issue 7. Text-topic supervision (TextTopicNet; the thesis's best: LDA + softmax) and
    # rotation prediction (RotNet) use SimCLR's AdamW settings (the thesis used SGD).
    "topics": dict(objectives=[("topic_softmax", 1.0)], lr=3.2e-3, weight_decay=0.1),
    "rotation": dict(objectives=[("rotation", 1.0)], lr=3.2e-3, weight_decay=0.1),
    # MoCo v3 ViT: AdamW lr 1.5e-4 * batch / 256 (2.4e-3 at 4096), wd 0.1, T 0.2, m 0.99 -> 1.
    "mocov3": dict(objectives=[("mocov3", 1.0)], lr=2.4e-3, weight_decay=0.1),
    # SLIP with MoCo v3 in place of SimCLR, SLIP's lr/wd.
    "slip_mocov3": dict(objectives=[("clip", 1.0), ("mocov3", 1.0)], lr=3e-3, weight_decay=0.1),
}

TEXT_MODELS = ("lda", "lsa", "word2vec", "bert")  # tools/fit_topics.py --kind

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


def train_source(
    root: str,
    name: str,
    weight: float,
    use_labels: bool = False,
    templates: str = "simple",
    captions: int = 0,
) -> dict:
    """One `data.sources` entry: ROOT/NAME/NAME-train-*.tfrecord with its class names
    (`captions`: draw among each record's first texts only, 0: all)."""
    return dict(
        shards=f"{root}/{name}/{name}-train-*.tfrecord",
        weight=weight,
        classnames=f"{root}/{name}/{name}-classnames.json",
        use_labels=use_labels,
        prompt_templates=templates,
        captions=captions,
    )


def embedded_sources(
    root: str = DATA_ROOT,
    fashion_weight: float = 0.0,
    openclipart_weight: float = 0.0,
    emojione_weight: float = 0.0,
) -> dict:
    """The embedded default: emoji image-text pairs (weight 1), plus, when their weights are
    > 0, Fashion-MNIST image-label data, OpenClipArt image-text pairs and the training emoji
    in EmojiOne's art (train splits only; weights are relative, as `data.sources.*.weight`).
    A source given a weight whose shards were not built (e.g. make_shards embedded without
    OpenClipArt) fails when the pipeline opens it, naming the source and the glob."""
    weights = {
        "fashion": fashion_weight,
        "openclipart": openclipart_weight,
        "emojione": emojione_weight,
    }
    for name, weight in weights.items():
        if weight < 0:
            raise ValueError(f"{name} weight must be >= 0, got {weight}")
    sources = {"emoji": train_source(root, "emoji", 1.0)}
    if fashion_weight > 0:
        sources["fashion_mnist"] = train_source(
            root, "fashion_mnist", fashion_weight, use_labels=True, templates="imagenet80"
        )
    if openclipart_weight > 0:
        sources["openclipart"] = train_source(root, "openclipart", openclipart_weight)
    if emojione_weight > 0:  # emoji_styles/emojione-train-*: the same emoji, another font
        styles = f"{root}/emoji_styles"
        sources["emojione"] = dict(
            train_source(styles, "emojione", emojione_weight),
            shards=f"{styles}/emojione-train-*.tfrecord",
            classnames=f"{styles}/emojione-classnames.json",
        )
    return sources


def embedded_evals(root: str = DATA_ROOT, image_size: int = 32) -> dict:
    """The evaluations of the embedded data, sized for the quick start's budget (2 cores).

    - emoji_zero_shot / emoji_group_zero_shot: held-out emoji (split by base emoji) over the
      99 subgroups / their 9 groups (`label_map`: emoji-groups.json), template set `emoji`.
    - fashion_zero_shot: the Fashion-MNIST test split, 10 classes, template set `fashion`.
    - emoji_retrieval (+ openclipart_retrieval when its shards exist): held-out captions.
    - emojione_* / symbola_* (when built): the same zero-shot and retrieval on the held-out
      emoji drawn in other art styles, a transfer check beyond the training font.
    - emoji_linear_probe: train on emoji train, test on held-out emoji, 99 subgroups (test
      holds only some of them; see linear_probe.py); fashion_linear_probe beside it, on the
      class token and on the patch tokens pooled to 4 x 4 cells ("grid4").
    Every zero-shot averages its template set's prompts per class (zero_shot.py).
    """
    emoji_train = f"{root}/emoji/emoji-train-*.tfrecord"
    emoji_test = f"{root}/emoji/emoji-test-*.tfrecord"
    emoji_names = f"{root}/emoji/emoji-classnames.json"
    fashion = f"{root}/fashion_mnist/fashion_mnist"
    evals = {
        "emoji_zero_shot": dict(
            type="zero_shot",
            shards=emoji_test,
            classnames=emoji_names,
            templates="emoji",
            image_size=image_size,
        ),
        "emoji_group_zero_shot": dict(
            type="zero_shot",
            shards=emoji_test,
            classnames=emoji_names,
            label_map=f"{root}/emoji/emoji-groups.json",
            templates="emoji",
            image_size=image_size,
        ),
        "fashion_zero_shot": dict(
            type="zero_shot",
            shards=f"{fashion}-test-*.tfrecord",
            classnames=f"{fashion}-classnames.json",
            templates="fashion",
            image_size=image_size,
            limit=2000,
        ),
        # Captions: the CLDR name of each held-out emoji (one per image, 766-way).
        "emoji_retrieval": dict(
            type="retrieval", shards=emoji_test, image_size=image_size, captions=1
        ),
        "emoji_linear_probe": dict(
            type="linear_probe",
            train_shards=emoji_train,
            test_shards=emoji_test,
            classnames=emoji_names,
            image_size=image_size,
            raw_pixel_size=8,
            Cs=(0.1, 1.0),
            max_iter=300,
        ),
        "fashion_linear_probe": dict(
            type="linear_probe",
            train_shards=f"{fashion}-train-*.tfrecord",
            test_shards=f"{fashion}-test-*.tfrecord",
            image_size=image_size,
            train_limit=10000,
            test_limit=2000,
            # The class token and the patch tokens pooled to 4 x 4 cells (2048-d for the tiny
            # ViT: where things are, as raw pixels have it). 150 L-BFGS iterations keep the
            # probe's time level with the one before (emb, feature at 1000) on 2 cores; the
            # README's Evaluation section has both settings' numbers.
            layers=("feature", "grid4"),
            max_iter=150,
        ),
    }
    # OpenClipArt is optional data (tools/make_shards.py): evaluated when its shards exist.
    clipart_test = f"{root}/openclipart/openclipart-test-*.tfrecord"
    if glob.glob(clipart_test):
        evals["openclipart_retrieval"] = dict(
            type="retrieval", shards=clipart_test, image_size=image_size, limit=1000, captions=1
        )
    # The held-out emoji in other art styles (EmojiOne, Symbola; input_pipeline/sources/
    # emoji_styles.py), when built: does the tower transfer beyond Noto's art? Retrieval is
    # over the names the style covers (366 and 234 of the 766), so its R@1 is not the Noto one's.
    for style in ("emojione", "symbola"):
        shards = f"{root}/emoji_styles/{style}-test-*.tfrecord"
        if glob.glob(shards):
            evals[f"{style}_zero_shot"] = dict(evals["emoji_zero_shot"], shards=shards)
            evals[f"{style}_retrieval"] = dict(evals["emoji_retrieval"], shards=shards)
    # Stated, so the command line can turn them off (`--config.evals.NAME.baselines=False`):
    # the raw-pixel and random-init reruns cost as much as the evaluations themselves.
    for cfg in evals.values():
        cfg["baselines"] = True
    return evals


def select_evals(evals: Mapping, names: Sequence[str], baselines: bool = True) -> dict:
    """`evals` cut to `names` (none: all), in that order, each with `baselines` set."""
    keep = [n for n in names if n] or list(evals)
    unknown = sorted(set(keep) - set(evals))
    if unknown:
        raise ValueError(f"evals: unknown {unknown}; valid: {sorted(evals)}")
    return {name: dict(evals[name], baselines=baselines) for name in keep}


def finetune_evals(root: str = DATA_ROOT, image_size: int = 32) -> dict:
    """SLIP's third protocol on the embedded data: the image tower plus a new linear head
    trained end to end (evaluation/finetune.py), beside the same tower from random init.
    They train, so no recipe runs them by default; `tools/reproduce.py --evals` and
    `tools/finetune_eval.py --eval` add them.

    - emoji_finetune: emoji train -> held-out emoji, 99 subgroups (emoji_linear_probe's
      task), 10 epochs at batch 128 (230 steps, ~2.3 min for the tiny ViT on 2 cores);
    - fashion_finetune: 10,000 Fashion-MNIST train images for 3 epochs at batch 256, 2,000
      test images (~6 min).
    Both crop to (0.5, 1) of the image: an emoji or a garment cut to 8% is no longer one.
    """
    fashion = f"{root}/fashion_mnist/fashion_mnist"
    common = dict(type="finetune", image_size=image_size, crop_scale=(0.5, 1.0), plots=False)
    return {
        "emoji_finetune": dict(
            common,
            train_shards=f"{root}/emoji/emoji-train-*.tfrecord",
            test_shards=f"{root}/emoji/emoji-test-*.tfrecord",
            classnames=f"{root}/emoji/emoji-classnames.json",
            epochs=10,
            batch_size=128,
        ),
        "fashion_finetune": dict(
            common,
            train_shards=f"{fashion}-train-*.tfrecord",
            test_shards=f"{fashion}-test-*.tfrecord",
            classnames=f"{fashion}-classnames.json",
            train_limit=10000,
            test_limit=2000,
            epochs=3,
            batch_size=256,
        ),
    }


def topic_sources(root: str = DATA_ROOT, kind: str = "lda") -> dict:
    """Emoji image-text pairs with `topics` targets, written by

    python tools/fit_topics.py --fit 'ROOT/emoji/emoji-train-*.tfrecord' \\
        --apply 'ROOT/emoji/emoji-test-*.tfrecord' --kind KIND --output_dir ROOT/topics_KIND/emoji
    """
    if kind not in TEXT_MODELS:
        raise ValueError(f"unknown text model {kind!r}; valid: {TEXT_MODELS}")
    source = train_source(root, "emoji", 1.0)
    source["shards"] = f"{root}/topics_{kind}/emoji/emoji-train-*.tfrecord"
    return {"emoji": source}


def recipe(
    method: str,
    size: str,
    arg: str | None = None,
    *,
    objectives: list | None = None,
    extensions: tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """The full config for `method` x `size` (its lr/wd), optionally with other objective
    terms. `extensions`: modules or .py files registering terms, outputs, heads or
    evaluators of a user's own; imported here and by every run of the config."""
    # .py paths are made absolute now, so the run's config.json works from any folder.
    extensions = tuple(os.path.abspath(e) if str(e).endswith(".py") else e for e in extensions)
    import_extensions(extensions)
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; valid: {sorted(RECIPES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {sorted(SIZES)}")
    r, s = RECIPES[method], SIZES[size]
    tiny = size == "tiny"
    # UniCL mixes image-label data (Fashion-MNIST) into the image-text stream by default.
    args = parse_arg(
        arg,
        data=DATA_ROOT,
        fashion=0.5 if method == "unicl" else 0.0,
        openclipart=0.0,  # weight of the OpenClipArt pairs beside emoji's 1.0 (0: left out)
        emojione=0.0,  # weight of the training emoji in EmojiOne's art (0: left out)
        topics="lda",  # text model of the topic targets (topic recipes)
        topic_dim=40,
        # The text tower: "own" (CLIP's transformer trained from scratch on a sentencepiece
        # tokenizer), "bert" (pretrained all-MiniLM-L6-v2, its own WordPiece tokenizer), or
        # "bert_scratch" (the same BERT architecture at random init).
        text="own",
        text_lock=False,  # LiT's "U L": the pretrained text tower frozen
        # Keep only these evaluations ("+"-joined names; "": all), and their baselines or
        # not: a tuning try that reads two numbers need not pay for the rest.
        evals="",
        baselines=True,
    )
    if args.text not in ("own", "bert", "bert_scratch"):
        raise ValueError(f"text={args.text!r}; valid: own, bert, bert_scratch")
    terms = list(objectives if objectives is not None else r["objectives"])
    names = {spec[0] for spec in terms}
    # The towers and heads to build are what the terms' outputs need (objectives/outputs.py).
    parts = model_parts(terms)
    needs_text = "text_encoder" in parts
    needs_ssl_head = "ssl_head" in parts
    needs_topics = "topic_head" in parts
    mocov3 = "mocov3" in names

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
            # Optional heads (mmssl_jax/models/extra_heads.py): a linear map to the K topics,
            # the 4-way rotation classifier, MoCo v3's predictor (4096 hidden, as MoCo v3).
            topic_head=dict(out=args.topic_dim) if needs_topics else None,
            rotation_head=dict() if "rotation_head" in parts else None,
            predictor=dict(hidden=(512,) if tiny else (4096,)) if "predictor" in parts else None,
            # A pretrained BERT-family tower (text_encoder="bert"): a Hugging Face directory or
            # a registered name ("all-minilm-l6-v2"); its sizes come from its config.json.
            text_path="",
            text_pretrained=True,  # False: the BERT architecture at random init
            vocab_size=-1,  # -1: read from the tokenizer
            context_length=32 if tiny else 77,
            dtype="float32",
            remat=False,
            attention_impl="",  # "": XLA's choice; "cudnn": fused kernel (NVIDIA GPU, bf16)
            init_temperature=0.07,  # 1 / the learnable logit scale at init (CLIP's 0.07)
        )
    )
    config.extensions = tuple(extensions)
    config.objectives = terms
    # A head a user's term registered (models/extra_heads.py) is built at its defaults.
    for part in sorted(parts - set(config.model)):
        if part in head_names():
            config.model[part] = {}
    config.objective_options = ml_collections.ConfigDict(
        dict(simclr=dict(temperature=0.1), supcon=dict(temperature=0.1))
    )
    if mocov3:
        config.objective_options.mocov3 = dict(temperature=0.2)
        # Momentum of the EMA encoder: cosine from base to final over the run (MoCo v3).
        config.momentum = ml_collections.ConfigDict(dict(base=0.99, final=1.0))

    config.data = ml_collections.ConfigDict(
        dict(
            sources=(
                topic_sources(args.data, args.topics)
                if needs_topics
                else embedded_sources(args.data, args.fashion, args.openclipart, args.emojione)
            ),
            # The tiny recipes train a sentencepiece model on the embedded captions (make_shards
            # embedded); the real ones tokenize as CLIP and SLIP do: CLIP's byte-level BPE
            # (49,408 ids, context 77), shipped with the package, so nothing needs training.
            tokenizer=f"{args.data}/tokenizer/spm.model" if tiny else "clip_bpe",
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
            topic_dim=args.topic_dim if needs_topics else 0,
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
    if mocov3:
        # MoCo v3's asymmetric views: jitter (0.4, 0.4, 0.2, 0.1); blur 1.0 / 0.1; solarize
        # 0 / 0.2 (view b overrides these fields of config.augment).
        config.augment.update(dict(saturation=0.2, blur_prob=1.0))
        config.augment_view_b = ml_collections.ConfigDict(dict(blur_prob=0.1, solarize_prob=0.2))
    # The CLIP image's colour augmentation, off as in SLIP (every probability 0); turn parts
    # on from the command line, e.g. --config.augment_image.grayscale_prob=0.2. No hue or
    # saturation by default: an emoji's colour can be its name (skin tones, hearts).
    config.augment_image = ml_collections.ConfigDict(
        dict(
            config.augment.to_dict(),
            saturation=0.0,
            hue=0.0,
            jitter_prob=0.0,
            grayscale_prob=0.0,
            blur_prob=0.0,
            solarize_prob=0.0,
        )
    )

    config.optim = ml_collections.ConfigDict(
        dict(
            # SLIP's lr at batch 4096 over 25 epochs of millions of pairs; the tiny CPU runs
            # last a few hundred steps at batch 128, where 2e-3 learns in minutes.
            lr=2e-3 if tiny else r["lr"],
            weight_decay=r["weight_decay"],
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            warmup_epochs=1.0,
            warmup_steps=-1,
            start_lr=1e-6,
            end_lr=1e-5,
            grad_clip_norm=0.0,
            # Per-parameter rules, (regex over the '/'-joined parameter path, value), first
            # match wins (mmssl_jax/training/param_rules.py): frozen parameters (LiT), lr
            # multipliers, layer-wise lr decay (0: off) and weight-decay multipliers (SLIP's rule).
            # Tuples, so the command line can override them:
            # --config.optim.freeze="(('image_encoder/.*', True),)"
            freeze=(),
            lr_mults=(),
            layer_decay=0.0,
            wd_mults=tuple(SLIP_WD_RULES),
        )
    )
    # Start from an export/checkpoint's weights (mmssl_jax/training/init_from.py); "": from
    # scratch.
    # skip: regexes of parameters left at their fresh initialisation (e.g. a new head).
    config.init_from = ml_collections.ConfigDict(dict(path="", skip=()))
    config.train = ml_collections.ConfigDict(
        dict(
            # tiny: 10 epochs of the 2,889 emoji pairs at batch 128 (220 steps), about ten
            # minutes on 2 CPU cores; the real recipes: SLIP's 25 epochs at 4096.
            batch_size=128 if tiny else 4096,
            epochs=10.0 if tiny else 25.0,
            total_steps=-1,  # > 0 overrides epochs
            grad_accum=1,
            log_every=10 if tiny else 50,
            ckpt_every=200 if tiny else 1000,
            keep_ckpts=3,
            eval_every=-1,  # -1: evaluate at the end only
            max_bad_steps=10,
            num_devices=-1,  # -1: all devices
            # Emulated CPU devices when the main command runs on the CPU (0: JAX's one). The
            # batch is then split over them: XLA:CPU runs each convolution on one core, so a
            # conv tower keeps a second core busy only through a second device.
            cpu_devices=0,
            # FSDP (ZeRO-3): shard parameters and optimizer moments over the data axis by
            # their largest divisible dimension; tensors under fsdp_min_size_mb replicated.
            fsdp=False,
            fsdp_min_size_mb=4.0,
            # A locked text tower's features computed once per distinct caption and fed to
            # the step (mmssl_jax/training/text_cache.py): set below for the tiny recipes
            # with text_lock, whose captions repeat; web captions rarely do.
            cache_locked_text=False,
            text_cache_entries=500_000,
            progress=True,
        )
    )
    config.evals = ml_collections.ConfigDict(
        select_evals(
            embedded_evals(args.data, s["image_size"]), args.evals.split("+"), args.baselines
        )
    )
    if needs_text:
        # The ridge-map baseline of the text evaluations (evaluation/baselines.py): pixels of
        # `limit` emoji training images (a seeded random subset) -> the text tower's space;
        # embedding their ~3 captions each costs about 30 s on 2 cores with MiniLM at 1000.
        # The hook runs it only with a pretrained text tower (text=bert).
        config.eval_baselines = ml_collections.ConfigDict(
            dict(
                ridge_map=dict(
                    shards=f"{args.data}/emoji/emoji-train-*.tfrecord",
                    limit=1000,
                    image_size=s["image_size"],
                    raw_pixel_size=16,
                    alphas=(0.1, 1.0, 10.0, 100.0, 1000.0),
                    val_fraction=0.2,
                )
            )
        )
    if not tiny and needs_text:  # CLIP's BPE ids: pad 0 is "!", so pool at EOT = argmax
        config.model.text_overrides = {"pool": "argmax"}
    if args.text != "own" and needs_text:
        config.model.text_encoder = "bert"
        config.model.text_path = "all-minilm-l6-v2"
        config.model.text_pretrained = args.text == "bert"
        config.data.tokenizer = ""  # the BERT directory's own tokenizer.json
        if args.text_lock:
            config.optim.freeze = tuple(lock_tower("text_encoder"))
            config.train.cache_locked_text = tiny
    return config

"""End-to-end fine-tuning: the image tower plus a linear head, all trained (SLIP's third
protocol, after zero-shot and the linear probe).

The pretrained tower's "feature" output feeds a new linear head; every parameter trains with
AdamW on a short warmup + cosine schedule (`optim.make_optimizer`, so `layer_decay` is the
same BEiT/MAE rule as in training: block i of L gets decay**(L - i), the embeddings
decay**(L + 1), the final norm and the head 1). Training images get a random resized crop and
a horizontal flip on the device, inside the jitted step; test images are the eval pipeline's
centre crops. When the encoder exposes a `mesh`, batches are split over its data axis and the
parameters replicated, as in training. Test batches are padded to one shape and the padding
masked out of the count, so every test example is scored exactly once.

Unlike the other evaluators this one needs the model, not only features: the encoder must
expose `model` (a `MultimodalModel`, or anything with an `image_encoder` submodule) and
`variables` (with `params["image_encoder"]`), as `inference.ModelEncoder` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from input_pipeline import augment
from mmssl_jax.evaluation import context
from mmssl_jax.training import optim
from mmssl_jax.training.state import TrainState
from mmssl_jax.training.step import LossFn, make_step

TOWER = "image_encoder"  # the parameter scope layer_decay's rules know (param_rules.TOWERS)
# The evaluation config keys `finetune` takes as keyword arguments.
HYPER_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "layer_decay",
    "warmup_epochs",
    "crop_scale",
    "seed",
)


class Classifier(nn.Module):
    """An image tower's "feature" -> a linear head of `num_classes` logits."""

    image_encoder: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        feature = self.image_encoder(images, train=train)["feature"].astype(jnp.float32)
        head = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), name="head")
        return head(feature)


@dataclasses.dataclass
class FinetuneResult:
    """Test metrics, the final variables and the training loss per step."""

    metrics: dict[str, float]
    variables: dict[str, Any]
    losses: np.ndarray


def tower_of(encoder: Any) -> tuple[nn.Module, dict[str, Any]]:
    """(image tower module, its variables {"params", ["batch_stats"]}) of a model encoder."""
    model, variables = getattr(encoder, "model", None), getattr(encoder, "variables", None)
    tower = getattr(model, TOWER, None)
    if tower is None or not variables or TOWER not in variables.get("params", {}):
        raise ValueError(
            f"finetune needs an encoder with a trainable image tower (`model.{TOWER}` and "
            f"`variables['params']['{TOWER}']`, as inference.ModelEncoder); got "
            f"{type(encoder).__name__}"
        )
    out = {k: v[TOWER] for k, v in variables.items() if isinstance(v, dict) and TOWER in v}
    return tower, out


def init_variables(
    model: Classifier, tower_vars: dict[str, Any], image_size: int, seed: int
) -> dict[str, Any]:
    """The classifier's variables: the given tower's (copied) and a freshly initialised head."""
    x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(seed), x))
    kernel_shape = shapes["params"]["head"]["kernel"].shape
    params = {
        TOWER: jax.tree.map(jnp.array, tower_vars["params"]),
        "head": {
            "kernel": nn.initializers.normal(0.01)(jax.random.key(seed), kernel_shape),
            "bias": jnp.zeros((kernel_shape[1],), jnp.float32),
        },
    }
    out = {"params": params}
    for collection, value in tower_vars.items():
        if collection != "params":
            out[collection] = {TOWER: jax.tree.map(jnp.array, value)}
    return out


# ----------------------------------------------------------------------------- steps


def _apply(model: Classifier, variables: dict, x: jax.Array, train: bool):
    """(logits, new non-param collections); BatchNorm statistics update when training."""
    extra = [k for k in variables if k != "params"]
    if train and extra:
        logits, updates = model.apply(variables, x, True, mutable=extra)
        return logits, dict(updates)
    return model.apply(variables, x, train), {k: variables[k] for k in extra}


def classifier_loss(model: Classifier, crop_scale: tuple[float, float] | None) -> LossFn:
    """Cross-entropy of the classifier on device-augmented views (`augment.crop_flip`;
    `crop_scale` None: the images as given), as a LossFn for training's `make_step`."""

    def loss_fn(params, batch_stats, batch, key, ema=None):
        if crop_scale is None:
            x = augment.to_float(batch["image"])
        else:
            x = augment.crop_flip(batch["image"], key, tuple(crop_scale))
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        logits, extra = _apply(model, variables, augment.normalize(x), True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, ({}, extra.get("batch_stats", batch_stats))

    return loss_fn


def make_train_step(
    model: Classifier,
    tx: optax.GradientTransformation,
    *,
    crop_scale: tuple[float, float] | None = (0.08, 1.0),
):
    """The jitted training step (`training.step.make_step`, the one pretraining uses: the
    same optimizer, non-finite guard and counters) of `classifier_loss`:
    (TrainState, {"image": uint8, "label": int32}) -> (TrainState, metrics)."""
    return jax.jit(make_step(tx, classifier_loss(model, crop_scale)))


def initial_state(variables: dict[str, Any], tx: optax.GradientTransformation, seed: int):
    """A TrainState over the classifier's variables with fresh optimizer state."""
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped_steps=jnp.zeros((), jnp.int32),
        bad_streak=jnp.zeros((), jnp.int32),
    )


def make_eval_step(model: Classifier):
    """A jitted (variables, images uint8, labels, mask) -> (correct, count) over one batch;
    masked-out rows (padding) count for neither."""

    def step(variables, images, labels, mask):
        logits, _ = _apply(model, variables, augment.normalize(augment.to_float(images)), False)
        hit = (jnp.argmax(logits, -1) == labels) & mask
        return hit.sum(), mask.sum()

    return jax.jit(step)


# ----------------------------------------------------------------------------- data


def round_batch(batch_size: int, mesh: Any = None, axis: str = "data") -> int:
    """The batch size rounded up to a multiple of the mesh's `axis` size (1 without mesh)."""
    size = mesh.shape[axis] if mesh is not None else 1
    return max(size, -(-int(batch_size) // size) * size)


def _put(tree: Any, mesh: Any, batch: bool) -> Any:
    if mesh is None:
        return jax.device_put(tree)
    from mmssl_jax.parallel import mesh as parallel

    sharding = parallel.batch_sharding(mesh) if batch else parallel.replicated(mesh)
    return jax.device_put(tree, sharding)


def train_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """`steps` index batches: each epoch a fresh permutation of range(n), its last batch
    filled up with random indices, so every example is seen once per epoch and no step is
    short."""
    rng = np.random.default_rng(seed)
    per_epoch = math.ceil(n / batch_size)
    done = 0
    while done < steps:
        order = rng.permutation(n)
        fill = per_epoch * batch_size - n
        order = np.concatenate([order, rng.integers(0, n, fill)])
        for i in range(per_epoch):
            if done == steps:
                return
            yield order[i * batch_size : (i + 1) * batch_size]
            done += 1


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) per batch over range(n) in order; the last batch is padded with index
    0 and masked, so each example is in exactly one batch with mask True."""
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        mask = np.ones(batch_size, bool)
        mask[len(idx) :] = False
        yield np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)]), mask


# ----------------------------------------------------------------------------- loops


def evaluate(
    model: Classifier,
    variables: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 256,
    mesh: Any = None,
    desc: str = "finetune test",
) -> dict[str, float]:
    """Top-1 accuracy over every example once: {top1, correct, count}."""
    batch_size = round_batch(min(batch_size, len(images)), mesh)
    step = make_eval_step(model)
    variables = _put(variables, mesh, batch=False)
    correct = count = 0
    batches = list(padded_batches(len(images), batch_size))
    for idx, mask in tqdm(batches, desc=desc, leave=False):
        batch = _put((images[idx], np.asarray(labels)[idx].astype(np.int32), mask), mesh, True)
        c, k = jax.device_get(step(variables, *batch))
        correct, count = correct + int(c), count + int(k)
    return {"top1": correct / max(count, 1), "correct": float(correct), "count": float(count)}


def train(
    model: Classifier,
    variables: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: float = 5.0,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float = 0.0,
    warmup_epochs: float = 1.0,
    crop_scale: tuple[float, float] | None = (0.08, 1.0),
    seed: int = 0,
    mesh: Any = None,
    desc: str = "finetune",
) -> tuple[dict[str, Any], np.ndarray]:
    """Trains every parameter end to end on (images uint8, labels); returns (variables,
    loss per step)."""
    n = len(images)
    batch_size = round_batch(min(batch_size, n), mesh)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    opt_cfg = ml_collections.ConfigDict(
        dict(
            lr=float(lr),
            weight_decay=float(weight_decay),
            layer_decay=float(layer_decay or 0.0),
            warmup_epochs=float(warmup_epochs),
            start_lr=0.0,
            end_lr=0.0,
            b2=0.999,
        )
    )
    tx, _ = optim.make_optimizer(opt_cfg, total, steps_per_epoch)
    step = make_train_step(model, tx, crop_scale=crop_scale)
    state = _put(initial_state(variables, tx, seed), mesh, batch=False)
    labels = np.asarray(labels).astype(np.int32)
    losses = []
    bar = tqdm(train_batches(n, batch_size, total, seed), total=total, desc=desc, leave=False)
    for i, idx in enumerate(bar):
        batch = _put({"image": images[idx], "label": labels[idx]}, mesh, batch=True)
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        if i % 10 == 0 or i == total - 1:
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    out = {
        "params": state.params,
        **({"batch_stats": state.batch_stats} if state.batch_stats else {}),
    }
    return out, np.asarray(jax.device_get(losses), np.float32)


def finetune(
    encoder: Any,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int | None = None,
    epochs: float = 5.0,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float = 0.0,
    warmup_epochs: float = 1.0,
    crop_scale: tuple[float, float] | None = (0.08, 1.0),
    seed: int = 0,
    desc: str = "finetune",
) -> FinetuneResult:
    """Fine-tunes `encoder`'s image tower plus a new linear head on (train_x, train_y) and
    scores top-1 on (test_x, test_y). The encoder's own variables are not changed."""
    tower, tower_vars = tower_of(encoder)
    if num_classes is None:
        num_classes = int(max(np.max(train_y), np.max(test_y))) + 1
    model = Classifier(tower, int(num_classes))
    mesh = getattr(encoder, "mesh", None)
    variables = init_variables(model, tower_vars, train_x.shape[1], seed)
    variables, losses = train(
        model,
        variables,
        train_x,
        train_y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        warmup_epochs=warmup_epochs,
        crop_scale=None if crop_scale is None else tuple(crop_scale),
        seed=seed,
        mesh=mesh,
        desc=f"{desc} train",
    )
    metrics = evaluate(
        model, variables, test_x, test_y, batch_size=batch_size, mesh=mesh, desc=f"{desc} test"
    )
    return FinetuneResult({"top1": metrics["top1"]}, jax.device_get(variables), losses)


# ---- the evaluator entry (type "finetune", found by name: see runner.py) ----

DEFAULTS = dict(
    **context.TRAIN_TEST,
    epochs=5.0,
    lr=1e-3,
    weight_decay=0.05,
    layer_decay=0.0,
    warmup_epochs=1.0,
    crop_scale=(0.08, 1.0),
)
SPLITS = context.TRAIN_TEST_SPLITS  # the shard keys it reads
NEEDS_TEXT = False  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = False  # whether the raw-pixel baseline applies
TSNE = False  # t-SNE map by default
PER_LAYER = False  # metrics are "<layer>/<metric>" rows


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""
    train = context.load_arrays(name, cfg, "train_shards")
    test = context.load_arrays(name, cfg, "test_shards")
    tr_keep = context.need_labels(name, "train_shards", train)
    te_keep = context.need_labels(name, "test_shards", test)
    classnames = context.load_classnames(cfg["classnames"])
    result = finetune(
        encoder,
        train["image"][tr_keep],
        np.asarray(train["label"])[tr_keep],
        test["image"][te_keep],
        np.asarray(test["label"])[te_keep],
        num_classes=len(classnames) if classnames else None,
        **{k: cfg[k] for k in HYPER_KEYS},
        desc=name,
    )
    return result.metrics

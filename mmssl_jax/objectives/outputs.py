"""The model outputs objective terms read, each declared once with what it needs.

A term names the outputs it reads (`register_term(name, needs)`); each output here says
how the train step computes it and what that takes:

- `views`: image views whose encoder features it reads. All views of a step share ONE
  encoder pass (concatenated along the batch), so SLIP's three images cost one call with
  bigger matmuls. A view is a batch array prepared on the device (`register_view`).
- `inputs`: other outputs it is computed from (MoCo v3's query reads the projector output).
- `batch_keys`: batch arrays it reads directly (labels, topic targets, ids).
- `parts`: model parts it needs (text_encoder, ssl_head, or an extra head of
  `models.extra_heads`); the config builder builds exactly these, and the trainer refuses a
  model that lacks one instead of dropping a term's input silently.
- `momentum`: computed by the momentum (EMA) encoder with no gradient (MoCo v3's keys).

A new term that reads existing outputs only registers the term. One that needs a new
output registers it here from its own file (see objectives/rotation.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from input_pipeline import augment


class Forward:
    """One step's forward state: the batch, the step key, the augmentation config and the
    module (bound by `model.apply`), with every view's feature and every output computed
    at most once."""

    def __init__(
        self, module: Any, batch: Mapping[str, jax.Array], key: jax.Array, aug_cfg: Any, train: bool
    ):
        self.module, self.batch, self.key = module, batch, key
        self.aug_cfg, self.train = aug_cfg, train
        self._features: dict[str, jax.Array] = {}
        self._values: dict[str, jax.Array] = {}

    def encode(self, views: Iterable[str]) -> None:
        """Encodes the given views in one image-encoder pass."""
        names = [v for v in views if v not in self._features]
        if not names:
            return
        images = [VIEWS[v].prepare(self) for v in names]
        n = images[0].shape[0]
        feats = self.module.image_encoder(jnp.concatenate(images, axis=0), train=self.train)
        for i, name in enumerate(names):
            self._features[name] = feats["feature"][i * n : (i + 1) * n]

    def feature(self, view: str) -> jax.Array:
        """The raw image-encoder feature of `view`."""
        self.encode([view])
        return self._features[view]

    def get(self, name: str) -> jax.Array:
        """Output `name`, computing it (and what it reads) on first use."""
        if name not in self._values:
            self._values[name] = output(name).fn(self)
        return self._values[name]


@dataclasses.dataclass(frozen=True)
class View:
    """An image view: batch array `batch_key` (uint8) prepared into a normalised float image."""

    name: str
    batch_key: str
    prepare: Callable[[Forward], jax.Array]


@dataclasses.dataclass(frozen=True)
class Output:
    name: str
    fn: Callable[[Forward], jax.Array]
    views: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    batch_keys: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    momentum: bool = False


VIEWS: dict[str, View] = {}
OUTPUTS: dict[str, Output] = {}


def register_view(name: str, prepare: Callable[[Forward], jax.Array], batch_key: str = "") -> View:
    """Registers image view `name` read from batch array `batch_key` (default: `name`)."""
    if name in VIEWS:
        raise ValueError(f"image view {name!r} is already registered")
    VIEWS[name] = View(name, batch_key or name, prepare)
    return VIEWS[name]


def register_output(
    name: str,
    fn: Callable[[Forward], jax.Array],
    *,
    views: Iterable[str] = (),
    inputs: Iterable[str] = (),
    batch_keys: Iterable[str] = (),
    parts: Iterable[str] = (),
    momentum: bool = False,
) -> Output:
    """Registers model output `name` = `fn(forward)`; see the module docstring."""
    if name in OUTPUTS:
        raise ValueError(f"model output {name!r} is already registered")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"output {name!r} reads unregistered image views {unknown}")
    OUTPUTS[name] = Output(
        name, fn, tuple(views), tuple(inputs), tuple(batch_keys), tuple(parts), momentum
    )
    return OUTPUTS[name]


def output(name: str) -> Output:
    if name not in OUTPUTS:
        raise ValueError(
            f"no model output {name!r} is registered (objectives/outputs.py); "
            f"registered: {sorted(OUTPUTS)}"
        )
    return OUTPUTS[name]


def closure(names: Iterable[str]) -> list[str]:
    """`names` and every output they are computed from, inputs first."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        for dep in output(n).inputs:
            visit(dep)
        order.append(n)

    for n in sorted(names):
        visit(n)
    return order


def batch_keys(names: Iterable[str]) -> set[str]:
    """The batch arrays the pipeline must deliver for these outputs ("index" always)."""
    keys = {"index"}
    for n in closure(names):
        out = output(n)
        keys.update(out.batch_keys)
        keys.update(VIEWS[v].batch_key for v in out.views)
    return keys


def model_parts(names: Iterable[str]) -> set[str]:
    """The model parts (towers and heads) these outputs need."""
    return set().union(*(output(n).parts for n in closure(names)))


def needs_momentum(names: Iterable[str]) -> bool:
    return any(output(n).momentum for n in closure(names))


def compute(
    module: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    aug_cfg: Any,
    train: bool,
    names: Iterable[str],
    momentum: bool = False,
) -> dict[str, jax.Array]:
    """The outputs `names` (only the `momentum` ones when `momentum`); run it through
    `model.apply(..., method=compute)` so `module` is bound."""
    wanted = [n for n in closure(names) if output(n).momentum == momentum]
    fwd = Forward(module, batch, key, aug_cfg, train)
    views = {v for n in wanted for v in output(n).views}
    fwd.encode([v for v in VIEWS if v in views])  # registration order: image, view_a, ...
    return {n: fwd.get(n) for n in wanted}


def check_model(model: Any, names: Iterable[str], terms: Iterable[str]) -> None:
    """Raises naming the first model part these outputs need that `model` lacks."""
    have = {"image_encoder"}
    if model.text_encoder is not None:
        have.add("text_encoder")
    if model.ssl_head is not None:
        have.add("ssl_head")
    have.update(model.head_names)
    for n in closure(names):
        for part in output(n).parts:
            if part not in have:
                raise ValueError(
                    f"objective terms {sorted(terms)} read output {n!r}, which needs "
                    f"model.{part}; the model config does not set it"
                )


# ---- the shared views and outputs -----------------------------------------------------------

# fold_in constants of the step key: views 1, 2 (SSL views a, b), 3 (rotation), 4 (image).
SSL_VIEWS = ("view_a", "view_b")
IMAGE_KEY = 4


class ViewAugments(NamedTuple):
    """The device's colour augmentation per view: the two SSL views' configs and the CLIP
    image's, None where the image goes in as cropped (SLIP's recipe; `config.augment_image`
    with every probability 0)."""

    view_a: augment.AugmentConfig
    view_b: augment.AugmentConfig
    image: augment.AugmentConfig | None = None


def _image(f: Forward) -> jax.Array:
    cfg = getattr(f.aug_cfg, "image", None)
    if cfg is None or not f.train:
        return augment.normalize(augment.to_float(f.batch["image"]))
    k = jax.random.fold_in(f.key, IMAGE_KEY)
    return augment.normalize(augment.ssl_augment(f.batch["image"], k, f.batch["index"], cfg))


def _ssl_view(i: int) -> Callable[[Forward], jax.Array]:
    """SSL view i augmented on the device; `aug_cfg` is one config for both views or a pair
    (MoCo v3's asymmetric recipe)."""

    def prepare(f: Forward) -> jax.Array:
        cfg = f.aug_cfg[i] if isinstance(f.aug_cfg, tuple | list) else f.aug_cfg
        k = jax.random.fold_in(f.key, i + 1)
        return augment.normalize(
            augment.ssl_augment(f.batch[SSL_VIEWS[i]], k, f.batch["index"], cfg)
        )

    return prepare


register_view("image", _image)
register_view("view_a", _ssl_view(0))
register_view("view_b", _ssl_view(1))


def _passthrough(key: str) -> Callable[[Forward], jax.Array]:
    return lambda f: f.batch[key]


register_output(
    "image_emb",
    lambda f: f.module.image_projection(f.feature("image")).astype(jnp.float32),
    views=("image",),
)
# The batch array that replaces "tokens" when the text tower is locked and its features are
# cached (training/text_cache.py): then only the trainable projection runs in the step.
TEXT_FEATURE = "text_feature"


def _text_emb(f: Forward) -> jax.Array:
    if TEXT_FEATURE in f.batch:  # a locked tower's features, cached by the trainer
        return f.module.project_text(f.batch[TEXT_FEATURE])
    return f.module.encode_text(f.batch["tokens"], train=f.train)["emb"]


register_output("text_emb", _text_emb, batch_keys=("tokens",), parts=("text_encoder",))
for _i, _view in enumerate(SSL_VIEWS):
    register_output(
        f"ssl_{_view[-1]}",
        lambda f, v=_view: f.module.ssl_project_feature(f.feature(v), train=f.train),
        views=(_view,),
        parts=("ssl_head",),
    )
register_output("logit_scale", lambda f: f.module.scales()[0])
register_output("logit_bias", lambda f: f.module.scales()[1])
for _key in ("label", "index", "id_hash"):
    register_output(_key, _passthrough(_key), batch_keys=(_key,))

"""MultimodalModel: an image encoder, an optional text encoder, projections and loss scalars.

This is CLIP/SLIP's model as one linen Module. The image and text features are projected to
the joint space by bias-free `Projection`s (`image_projection`, `text_projection`); SLIP's
SimCLR MLP (`ssl_head`) reads the RAW image feature, not the projection. Two scalar params
serve the losses: `logit_scale` (log of the InfoNCE multiplier, init log(1/init_temperature),
CLIP's 0.07 by default) and `logit_bias` (SigLIP's bias, init -10; it costs nothing when unused).

`model.init(rng, images, tokens)` creates every parameter; the encode methods run parts of it:

    variables = model.init(rng, images, tokens)
    out = model.apply(variables, images, method=MultimodalModel.encode_image)

Embeddings (`emb`, `ssl_project`) are returned in float32 for the losses; `feature` and
`blocks` stay in the encoders' compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmssl_jax.models.heads import MLPHead, Projection
from mmssl_jax.models.vit import Dtype

INIT_TEMPERATURE = 0.07  # CLIP's: logit_scale starts at log(1 / 0.07)
LOGIT_SCALE_INIT = math.log(1 / INIT_TEMPERATURE)
LOGIT_BIAS_INIT = -10.0


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero): embeddings for cosine retrieval."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class MultimodalModel(nn.Module):
    """Image encoder + optional text encoder + projections + optional SimCLR head.

    Attributes:
      image_encoder: a registry image encoder (`__call__(images, train) -> dict`).
      text_encoder: a registry text encoder, or None for image-only (SimCLR) training.
      embed_dim: joint embedding size of both projections.
      ssl_head: SLIP's SimCLR MLP (`heads.simclr_head`) on the raw image feature, or None.
      max_logit_scale: `__call__` returns `exp(min(logit_scale, log(max_logit_scale)))`.
      init_temperature: `logit_scale` starts at log(1 / init_temperature).
      dtype: compute dtype of the projections; `param_dtype` the storage dtype.
      heads: the objectives' extra heads as `(name, input, MLPHead fields)` triples, built
        by `extra_heads.head_specs` (topic_head, rotation_head, predictor, or one a user
        registers there). `input` is "feature" (the raw image feature) or "ssl" (the
        `ssl_head` output); each head's parameters live under its own name.
    """

    image_encoder: nn.Module
    text_encoder: nn.Module | None = None
    embed_dim: int = 512
    ssl_head: MLPHead | None = None
    max_logit_scale: float = 100.0
    init_temperature: float = INIT_TEMPERATURE
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    heads: tuple[tuple[str, str, tuple[tuple[str, Any], ...]], ...] = ()

    def setup(self) -> None:
        proj = lambda: Projection(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        self.image_projection = proj()
        if self.text_encoder is not None:
            self.text_projection = proj()
        if not 1.0 / self.max_logit_scale <= self.init_temperature:
            raise ValueError(
                f"model.init_temperature={self.init_temperature} must be >= 1 / max_logit_scale"
                f" ({1.0 / self.max_logit_scale:g})"
            )
        init = nn.initializers.constant(math.log(1.0 / self.init_temperature))
        self.logit_scale = self.param("logit_scale", init, (), self.param_dtype)
        self.logit_bias = self.param(
            "logit_bias", nn.initializers.constant(LOGIT_BIAS_INIT), (), self.param_dtype
        )
        for name, _, fields in self.heads:  # submodules named by the head's own name
            kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, **dict(fields)}
            setattr(self, name, MLPHead(**kw))

    @property
    def head_names(self) -> tuple[str, ...]:
        """Names of the extra heads this model has."""
        return tuple(name for name, _, _ in self.heads)

    def has_head(self, name: str) -> bool:
        return name in self.head_names

    def apply_head(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
        """Extra head `name` on `x` (its input, see `heads`): float32 logits."""
        if not self.has_head(name):
            raise ValueError(f"this model has no head {name!r}; it has {self.head_names}")
        return getattr(self, name)(x, train=train).astype(jnp.float32)

    def encode_image(self, images: jax.Array, train: bool = False) -> dict:
        """`{"emb": [B, embed_dim] float32 (unnormalised), "feature", "blocks"}`, and the
        tower's spatial map `"grid"` [B, h, w, C] when it has one (ViT, ResNet)."""
        out = self.image_encoder(images, train=train)
        emb = self.image_projection(out["feature"]).astype(jnp.float32)
        result = {"emb": emb, "feature": out["feature"], "blocks": out["blocks"]}
        if "grid" in out:
            result["grid"] = out["grid"]
        return result

    def encode_text(self, tokens: jax.Array, train: bool = False) -> dict:
        """`{"emb": [B, embed_dim] float32 (unnormalised), "feature": [B, text width]}`."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder")
        out = self.text_encoder(tokens, train=train)
        return {"emb": self.project_text(out["feature"]), "feature": out["feature"]}

    def project_text(self, feature: jax.Array) -> jax.Array:
        """The joint-space text embedding (float32, unnormalised) of a text-tower feature:
        a locked tower's cached features (training/text_cache.py) skip the tower."""
        return self.text_projection(feature).astype(jnp.float32)

    def ssl_project(self, images: jax.Array, train: bool = False) -> jax.Array:
        """SimCLR embedding `[B, out]` float32 of `images` (encoder + head, as SLIP)."""
        feature = self.image_encoder(images, train=train)["feature"]
        return self.ssl_project_feature(feature, train=train)

    def ssl_project_feature(self, feature: jax.Array, train: bool = False) -> jax.Array:
        """SimCLR head on an already computed raw image feature (saves an encoder pass)."""
        if self.ssl_head is None:
            raise ValueError("this model has no ssl_head")
        return self.ssl_head(feature, train=train).astype(jnp.float32)

    def scales(self) -> tuple[jax.Array, jax.Array]:
        """`(exp(logit_scale) clamped to max_logit_scale, logit_bias)`, float32 scalars."""
        log_max = math.log(self.max_logit_scale)
        scale = jnp.exp(jnp.minimum(self.logit_scale, log_max)).astype(jnp.float32)
        return scale, self.logit_bias.astype(jnp.float32)

    def __call__(
        self, images: jax.Array, tokens: jax.Array | None = None, train: bool = False
    ) -> dict:
        """Runs every part once (so `init` creates all params).

        Returns `image_emb`, `image_feature`, `logit_scale` (exponentiated, clamped),
        `logit_bias`, plus `text_emb` with a text encoder, `ssl` with an ssl_head, and one
        entry per extra head, under the head's name.
        """
        image = self.encode_image(images, train=train)
        scale, bias = self.scales()
        out = {
            "image_emb": image["emb"],
            "image_feature": image["feature"],
            "logit_scale": scale,
            "logit_bias": bias,
        }
        if self.text_encoder is not None:
            if tokens is None:
                raise ValueError("a model with a text encoder needs tokens")
            out["text_emb"] = self.encode_text(tokens, train=train)["emb"]
        if self.ssl_head is not None:
            out["ssl"] = self.ssl_project_feature(image["feature"], train=train)
        for name, source, _ in self.heads:
            if source == "ssl" and self.ssl_head is None:
                raise ValueError(f"head {name!r} reads the ssl_head output; set model.ssl_head")
            x = out["ssl"] if source == "ssl" else image["feature"]
            out[name] = self.apply_head(name, x, train=train)
        return out

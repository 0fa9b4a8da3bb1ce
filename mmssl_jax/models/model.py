"""MultimodalModel: an image encoder, an optional text encoder, projections and loss scalars.

This is CLIP/SLIP's model as one linen Module. The image and text features are projected to
the joint space by bias-free `Projection`s (`image_projection`, `text_projection`); SLIP's
SimCLR MLP (`ssl_head`) reads the RAW image feature, not the projection. Two scalar params
serve the losses: `logit_scale` (log of the InfoNCE multiplier, init log(1/0.07)) and
`logit_bias` (SigLIP's bias, init -10; it costs nothing when unused).

`model.init(rng, images, tokens)` creates every parameter; the encode methods run parts of it:

    variables = model.init(rng, images, tokens)
    out = model.apply(variables, images, method=MultimodalModel.encode_image)

Embeddings (`emb`, `ssl_project`) are returned in float32 for the losses; `feature` and
`blocks` stay in the encoders' compute dtype.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmssl_jax.models.heads import MLPHead, Projection, SimCLRHead
from mmssl_jax.models.vit import Dtype

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_BIAS_INIT = -10.0


class MultimodalModel(nn.Module):
    """Image encoder + optional text encoder + projections + optional SimCLR head.

    Attributes:
      image_encoder: a registry image encoder (`__call__(images, train) -> dict`).
      text_encoder: a registry text encoder, or None for image-only (SimCLR) training.
      embed_dim: joint embedding size of both projections.
      ssl_head: a `SimCLRHead` applied to the raw image feature, or None.
      max_logit_scale: `__call__` returns `exp(min(logit_scale, log(max_logit_scale)))`.
      dtype: compute dtype of the projections; `param_dtype` the storage dtype.
      topic_head: an `MLPHead` from the raw image feature to the K topic logits (text-topic
        supervision), or None.
      rotation_head: an `MLPHead` from the raw image feature to 4 rotation logits, or None.
      predictor: MoCo v3's predictor `MLPHead` on the `ssl_head` output, or None.
    The three optional heads default to None, which keeps the parameter tree unchanged.
    """

    image_encoder: nn.Module
    text_encoder: nn.Module | None = None
    embed_dim: int = 512
    ssl_head: SimCLRHead | None = None
    max_logit_scale: float = 100.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    topic_head: MLPHead | None = None
    rotation_head: MLPHead | None = None
    predictor: MLPHead | None = None

    def setup(self) -> None:
        proj = lambda: Projection(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        self.image_projection = proj()
        if self.text_encoder is not None:
            self.text_projection = proj()
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), (), self.param_dtype
        )
        self.logit_bias = self.param(
            "logit_bias", nn.initializers.constant(LOGIT_BIAS_INIT), (), self.param_dtype
        )

    def encode_image(self, images: jax.Array, train: bool = False) -> dict:
        """`{"emb": [B, embed_dim] float32 (unnormalised), "feature", "blocks"}`."""
        out = self.image_encoder(images, train=train)
        emb = self.image_projection(out["feature"]).astype(jnp.float32)
        return {"emb": emb, "feature": out["feature"], "blocks": out["blocks"]}

    def encode_text(self, tokens: jax.Array, train: bool = False) -> dict:
        """`{"emb": [B, embed_dim] float32 (unnormalised), "feature": [B, text width]}`."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder")
        out = self.text_encoder(tokens, train=train)
        emb = self.text_projection(out["feature"]).astype(jnp.float32)
        return {"emb": emb, "feature": out["feature"]}

    def ssl_project(self, images: jax.Array, train: bool = False) -> jax.Array:
        """SimCLR embedding `[B, out]` float32 of `images` (encoder + head, as SLIP)."""
        feature = self.image_encoder(images, train=train)["feature"]
        return self.ssl_project_feature(feature, train=train)

    def ssl_project_feature(self, feature: jax.Array, train: bool = False) -> jax.Array:
        """SimCLR head on an already computed raw image feature (saves an encoder pass)."""
        if self.ssl_head is None:
            raise ValueError("this model has no ssl_head")
        return self.ssl_head(feature, train=train).astype(jnp.float32)

    def predict_topics(self, feature: jax.Array, train: bool = False) -> jax.Array:
        """Topic logits `[B, K]` float32 from a raw image feature (`topic_head`)."""
        if self.topic_head is None:
            raise ValueError("this model has no topic_head")
        return self.topic_head(feature, train=train).astype(jnp.float32)

    def predict_rotation(self, feature: jax.Array, train: bool = False) -> jax.Array:
        """Rotation logits `[B, 4]` float32 from a raw image feature (`rotation_head`)."""
        if self.rotation_head is None:
            raise ValueError("this model has no rotation_head")
        return self.rotation_head(feature, train=train).astype(jnp.float32)

    def predict_ssl(self, z: jax.Array, train: bool = False) -> jax.Array:
        """MoCo v3 query `[B, out]` float32: the predictor on an `ssl_head` output."""
        if self.predictor is None:
            raise ValueError("this model has no predictor")
        return self.predictor(z, train=train).astype(jnp.float32)

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
        `logit_bias`, plus `text_emb` with a text encoder, `ssl` with an ssl_head, and
        `topic_pred` / `rot_logits` / `ssl_pred` with the optional heads.
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
        if self.topic_head is not None:
            out["topic_pred"] = self.predict_topics(image["feature"], train=train)
        if self.rotation_head is not None:
            out["rot_logits"] = self.predict_rotation(image["feature"], train=train)
        if self.predictor is not None:
            if self.ssl_head is None:
                raise ValueError("a MoCo v3 predictor needs an ssl_head (the projector)")
            out["ssl_pred"] = self.predict_ssl(out["ssl"], train=train)
        return out

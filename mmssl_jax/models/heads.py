"""Heads on top of encoder features: the joint-space projection, SLIP's SimCLR MLP, and a
generic MLP head (topic prediction, rotation classifier, MoCo v3 predictor)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmssl_jax.models.vit import Dtype

# std = fan_in^-0.5 (plain normal): CLIP's `image_projection` / `text_projection` init.
FAN_IN_NORMAL = nn.initializers.variance_scaling(1.0, "fan_in", "normal")

NORMS = ("batch", "layer", "none")


class Projection(nn.Module):
    """Bias-free linear map to the joint embedding space, init std `in_width^-0.5` (CLIP)."""

    embed_dim: int = 512
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(
            self.embed_dim,
            use_bias=False,
            kernel_init=FAN_IN_NORMAL,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)


class MLPHead(nn.Module):
    """[Dense(h)-Norm-ReLU] for each h in `hidden`, then Dense(out) (bias on).

    The optional heads of the other objectives: the topic head (TextTopicNet: a linear map
    from the image feature to the K topics, `hidden=()`), the 4-way rotation classifier
    (RotNet), and MoCo v3's predictor (`hidden=(4096,)`, `norm="batch"`; MoCo v3's
    predictor has no norm after its last layer, as here). SLIP's SimCLR MLP is
    `simclr_head(hidden, out)`: two hidden layers of the same width.

    `norm="batch"` is SLIP's SyncBatchNorm: batch statistics while `train`, running averages
    (momentum 0.9, in the `batch_stats` collection) otherwise. Under `jax.jit` over globally
    sharded arrays the batch mean is already a global mean (XLA inserts the all-reduce), so the
    statistics are synchronised without `axis_name`; set `axis_name` only when the head runs
    per device inside `jax.shard_map` and statistics should be reduced over that mesh axis.
    `norm="layer"` and `norm="none"` need no mutable state.
    """

    out: int
    hidden: tuple[int, ...] = ()
    norm: str = "none"
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"fc{i}")(x)
            x = self._norm(x, train, name=f"norm{i}")
            x = nn.relu(x)
        name = f"fc{len(self.hidden)}"
        return nn.Dense(self.out, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    def _norm(self, x: jax.Array, train: bool, name: str) -> jax.Array:
        if self.norm == "batch":
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                axis_name=self.axis_name,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x)
        if self.norm == "layer":
            return nn.LayerNorm(
                epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name
            )(x)
        return x


def simclr_head(hidden: int = 4096, out: int = 256, norm: str = "batch", **kw: Any) -> MLPHead:
    """SLIP's `image_mlp`: Dense(hidden)-Norm-ReLU-Dense(hidden)-Norm-ReLU-Dense(out), biases
    on; parameters fc0, norm0, fc1, norm1, fc2 (the names SLIP checkpoints convert to)."""
    return MLPHead(out=out, hidden=(int(hidden), int(hidden)), norm=norm, **kw)

"""ResNet image encoder (torchvision's ResNet v1.5: stride in the 3x3 conv), no classifier.

Layer names and paddings mirror torchvision (explicit symmetric padding rather than "SAME"), so
converting a torchvision checkpoint is a rename and a transpose. Convs are bias-free with
Kaiming-normal (fan-out) init; BatchNorm uses momentum 0.9 (PyTorch's 0.1) and eps 1e-5. With
`zero_init_residual` (default, Goyal et al. 2017) the last BN scale of each bottleneck starts
at zero, so every block starts as the identity, which helps large-batch training from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmssl_jax.models.vit import Dtype

KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) with a projection shortcut when shapes differ."""

    planes: int
    strides: int = 1
    zero_init_residual: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda n, k, s, name: nn.Conv(
            n,
            (k, k),
            strides=(s, s),
            padding=[(k // 2, k // 2)] * 2,
            use_bias=False,
            kernel_init=KAIMING_FAN_OUT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        norm = lambda name, scale_init=nn.initializers.ones: nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            scale_init=scale_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        out_ch = 4 * self.planes
        y = nn.relu(norm("bn1")(conv(self.planes, 1, 1, "conv1")(x)))
        y = nn.relu(norm("bn2")(conv(self.planes, 3, self.strides, "conv2")(y)))
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = norm("bn3", last_init)(conv(out_ch, 1, 1, "conv3")(y))
        if self.strides != 1 or x.shape[-1] != out_ch:
            x = norm("downsample_bn")(conv(out_ch, 1, self.strides, "downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Bottleneck ResNet encoder.

    `__call__(images [B, H, W, 3] float, train) -> {"feature": [B, 32 * width], "blocks": tuple,
    "grid": [B, h, w, 32 * width]}`.
    `feature` is the global average pool of the last stage (2048-d for ResNet-50); `blocks[i]`
    is the global average pool of stage i (widths 4w, 8w, 16w, 32w); `grid` is the last
    stage's map before that pool. With `train=True` the
    BatchNorm running statistics in `batch_stats` must be marked mutable.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    zero_init_residual: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        x = nn.Conv(
            self.width,
            (7, 7),
            strides=(2, 2),
            padding=[(3, 3), (3, 3)],
            use_bias=False,
            kernel_init=KAIMING_FAN_OUT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv1",
        )(images)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn1",
        )(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        blocks = []
        for stage, count in enumerate(self.stage_sizes):
            for j in range(count):
                x = Bottleneck(
                    self.width * 2**stage,
                    strides=2 if stage > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage + 1}_{j}",
                )(x, train)
            blocks.append(x.mean(axis=(1, 2)))
        return {"feature": blocks[-1], "blocks": tuple(blocks), "grid": x}

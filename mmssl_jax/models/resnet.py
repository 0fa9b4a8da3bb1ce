"""ResNet image encoder (torchvision's ResNet v1.5: stride in the 3x3 conv), no classifier.

Layer names and paddings mirror torchvision (explicit symmetric padding rather than "SAME"), so
converting a torchvision checkpoint is a rename and a transpose. Convs are bias-free with
Kaiming-normal (fan-out) init; BatchNorm uses momentum 0.9 (PyTorch's 0.1) and eps 1e-5. With
`zero_init_residual` (default, Goyal et al. 2017) the last BN scale of each block starts
at zero, so every block starts as the identity, which helps large-batch training from scratch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmssl_jax.models.vit import Dtype

KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Block(nn.Module):
    """A residual block's fields: `planes` channels, `strides` in its first 3x3 conv."""

    planes: int
    strides: int = 1
    zero_init_residual: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class Bottleneck(_Block):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) with a projection shortcut when shapes differ."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(_norm, train, dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = 4 * self.planes
        y = nn.relu(norm("bn1")(conv(self.planes, 1, 1, "conv1")(x)))
        y = nn.relu(norm("bn2")(conv(self.planes, 3, self.strides, "conv2")(y)))
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = norm("bn3", last_init)(conv(out_ch, 1, 1, "conv3")(y))
        if self.strides != 1 or x.shape[-1] != out_ch:
            x = norm("downsample_bn")(conv(out_ch, 1, self.strides, "downsample_conv")(x))
        return nn.relu(x + y)


class BasicBlock(_Block):
    """3x3 (strided) -> 3x3 with a projection shortcut when shapes differ (ResNet-18/34)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(_norm, train, dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.relu(norm("bn1")(conv(self.planes, 3, self.strides, "conv1")(x)))
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = norm("bn2", last_init)(conv(self.planes, 3, 1, "conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.planes:
            x = norm("downsample_bn")(conv(self.planes, 1, self.strides, "downsample_conv")(x))
        return nn.relu(x + y)


def _conv(n: int, k: int, s: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    """torchvision's bias-free conv: k x k, stride s, symmetric padding k // 2."""
    return nn.Conv(
        n,
        (k, k),
        strides=(s, s),
        padding=[(k // 2, k // 2)] * 2,
        use_bias=False,
        kernel_init=KAIMING_FAN_OUT,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _norm(
    train: bool,
    name: str,
    scale_init: nn.initializers.Initializer = nn.initializers.ones,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=scale_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock}


class ResNet(nn.Module):
    """ResNet encoder of bottleneck (ResNet-50) or basic (ResNet-18) blocks.

    `__call__(images [B, H, W, 3] float, train) -> {"feature": [B, C], "blocks": tuple,
    "grid": [B, h, w, C]}`, C = 8 * width * expansion (2048 for ResNet-50, 512 for
    ResNet-18). `feature` is the global average pool of the last stage; `blocks[i]` is the
    global average pool of stage i; `grid` is the last stage's map before that pool.
    `stem="imagenet"` is torchvision's 7x7/2 conv + 3x3/2 max pool (a 224 px image reaches
    stage 1 at 56 px); `stem="cifar"` is one 3x3/1 conv and no pool, the usual stem for 32 px
    images, where the ImageNet stem would leave stage 1 an 8 x 8 map. With `train=True` the
    BatchNorm running statistics in `batch_stats` must be marked mutable.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    block: str = "bottleneck"
    stem: str = "imagenet"
    zero_init_residual: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        if self.block not in BLOCKS:
            raise ValueError(f"ResNet block {self.block!r}: valid are {sorted(BLOCKS)}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet stem {self.stem!r}: valid are 'imagenet', 'cifar'")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cifar = self.stem == "cifar"
        x = _conv(self.width, 3 if cifar else 7, 1 if cifar else 2, "conv1", **kw)(images)
        x = nn.relu(_norm(train, "bn1", **kw)(x))
        if not cifar:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        block_cls = BLOCKS[self.block]
        blocks = []
        for stage, count in enumerate(self.stage_sizes):
            for j in range(count):
                x = block_cls(
                    self.width * 2**stage,
                    strides=2 if stage > 0 and j == 0 else 1,
                    zero_init_residual=self.zero_init_residual,
                    name=f"layer{stage + 1}_{j}",
                    **kw,
                )(x, train)
            blocks.append(x.mean(axis=(1, 2)))
        return {"feature": blocks[-1], "blocks": tuple(blocks), "grid": x}

"""CLIP text transformer (the text tower of OpenAI CLIP and SLIP), without its projection.

Token embedding (std 0.02) plus learned positions (std 0.01), pre-LN residual attention blocks
with a causal mask and a QuickGELU MLP, LayerNorm eps 1e-5, a final LayerNorm. The feature is
the final-normed hidden state at the EOS token. CLIP finds EOS with `argmax(tokens)` because its
EOT id is the largest; our tokenizer pads with 0 and puts EOS right after the last text token
(INTERFACES.md), so the EOS position is `(tokens != 0).sum(-1) - 1`, independent of the vocab.

Init as CLIP: attention in-proj std `width^-0.5`, out-proj and MLP c_proj std
`width^-0.5 * (2 * layers)^-0.5`, MLP c_fc std `(2 * width)^-0.5`. Biases start at zero
(CLIP keeps PyTorch's small uniform Linear biases for the MLP; zero is the JAX convention and
makes no measurable difference). The projection to the joint space is `heads.Projection`,
owned by `model.MultimodalModel`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmssl_jax.models.vit import Block, Dtype, activation, quick_gelu  # noqa: F401

POOLS = ("eos", "argmax")


def eos_position(tokens: jax.Array) -> jax.Array:
    """Index of the EOS token per row under the pad-id-0 convention (0 for an all-pad row)."""
    return jnp.maximum((tokens != 0).sum(axis=-1) - 1, 0)


class TextTransformer(nn.Module):
    """CLIP text encoder.

    `__call__(tokens int32 [B, L], train) -> {"feature": [B, width], "sequence": [B, L, width]}`
    with `L <= context_length`. `sequence` is every position after the final norm (unused
    outputs cost nothing under jit). `remat=True` rematerialises each block in the backward pass.

    `pool="eos"` takes the feature at `eos_position` (this codebase's tokenizer);
    `pool="argmax"` at `argmax(tokens)`, as CLIP/SLIP do with CLIP's BPE tokens (EOT has the
    highest id), for converted PyTorch weights. `act="gelu"` is open_clip's own text tower.
    """

    vocab_size: int = 49_408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    remat: bool = False
    pool: str = "eos"
    act: str = "quick_gelu"
    attention_impl: str | None = None  # None (XLA) | "cudnn" (fused, GPU bf16)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> dict:
        del train  # No dropout or batch statistics; kept for a uniform encoder signature.
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        length = tokens.shape[-1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed context_length {self.context_length}")
        x = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embedding",
        )(tokens)
        pos = self.param(
            "positional_embedding",
            nn.initializers.normal(0.01),
            (self.context_length, self.width),
            self.param_dtype,
        )
        x = x + pos[:length].astype(x.dtype)

        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        block_cls = nn.remat(Block) if self.remat else Block
        for i in range(self.layers):
            x = block_cls(
                self.width,
                self.heads,
                mlp_ratio=4.0,
                ln_eps=1e-5,
                act=activation(self.act),
                causal=True,
                qkv_init=nn.initializers.normal(attn_std),
                proj_init=nn.initializers.normal(proj_std),
                fc1_init=nn.initializers.normal(fc_std),
                fc2_init=nn.initializers.normal(proj_std),
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"resblocks_{i}",
            )(x)
        x = nn.LayerNorm(
            epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final"
        )(x)
        pos = eos_position(tokens) if self.pool == "eos" else jnp.argmax(tokens, axis=-1)
        feature = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return {"feature": feature, "sequence": x}

"""Vision Transformer (ViT) image encoder, and the pre-LN transformer block shared with text.py.

Layout and init follow timm's `VisionTransformer` with `num_classes=0` (what SLIP uses): a
patch-embedding conv with bias, a class token, learned position embeddings, pre-LN blocks
(LayerNorm eps 1e-6, attention with qkv bias, MLP ratio 4, GELU), a final LayerNorm. Linear
weights are normal std 0.02 with zero biases, position embeddings std 0.02 and the
class token std 1e-6 (timm). Parameter names are timm's, so converting weights is a rename.

Parameters are stored in `param_dtype` (float32); `dtype` is the compute dtype (e.g. bfloat16).
Attention is `head_major_attention` (the numbers of `jax.nn.dot_product_attention`'s XLA path,
softmax in float32, laid out so XLA:CPU's dots need no copies, its backward written by hand);
`attention_impl="cudnn"` selects cuDNN's fused (flash) kernel on NVIDIA GPUs with bf16/fp16
compute, which never stores the [heads, T, T] probabilities. Dense layers over tokens see 2-D
`[tokens, D]` operands (`TokenDense`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
Dtype = jnp.dtype | type

# timm: trunc_normal_(std=.02) for Linear weights and position embeddings. timm's cut-offs are
# absolute (+-2), i.e. 100 std, so it is a plain normal (flax's truncated_normal cuts at 2 std,
# which shrinks the std by 12%).
TIMM_NORMAL = nn.initializers.normal(stddev=0.02)


def gelu_exact(x: jax.Array) -> jax.Array:
    """The erf GELU of PyTorch's `nn.GELU()` (flax's `nn.gelu` defaults to the tanh form).

    Written as PyTorch writes it, `x * (0.5 + 0.5 erf(x / sqrt 2))`: `jax.nn.gelu(x,
    approximate=False)` goes through `erfc`, which XLA:CPU recomputes in several backward
    fusions (tools/benchmarks/layers.py, case `gelu`, has both). Same values to float32
    rounding.
    """
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's GELU approximation `x * sigmoid(1.702 x)`."""
    return x * jax.nn.sigmoid(1.702 * x)


# Activations by name, so configs (and exported model configs) stay plain JSON.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "quick_gelu": quick_gelu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called `name` (see `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class TokenDense(nn.Dense):
    """`nn.Dense` over `x [..., D]` applied as one 2-D `[N, D]` matrix, reshaped back.

    The same parameters (`kernel`, `bias`) and the same dot as `nn.Dense`, but its weight
    gradient becomes a plain 2-D dot contracting over N: on XLA:CPU a 3-D operand made it copy
    the output gradient into a transposed layout first (a 128 -> 512 Dense over 192 x 65
    tokens: 101 -> 51 ms forward + backward on one core in `python tools/benchmarks/layers.py`).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


def head_major_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    key_valid: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention over [B, T, heads, head_dim], computed head-major.

    The numbers of `jax.nn.dot_product_attention`'s XLA path (float32 logits and softmax,
    masked keys at -0.7 * float32 max), but the operands are transposed once to
    [B, heads, T, head_dim], so the four batched dots of the forward and backward have their
    batch dims leading and need no layout copies, and the backward is written by hand
    (`_softmax_attention`). `key_valid [B, S]` masks padded keys.
    """
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    valid = None
    if causal:
        valid = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
    if key_valid is not None:
        keys = key_valid[:, None, None, :].astype(bool)
        valid = keys if valid is None else valid & keys
    return _softmax_attention(q, k, v, valid).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array | None
) -> jax.Array:
    """`softmax(q k^T / sqrt(d), masked where not valid) v` over [B, heads, T, head_dim].

    A custom VJP with FlashAttention's backward: `dS = P * (dP - rowsum(dO * O))`, which reads
    the [T, head_dim] output instead of reducing `dP * P` over [T, T], and applies the
    1/sqrt(d) scale to dq and dk, not to [T, T] gradients. XLA's derivative of the same
    forward is twice as slow on CPU (tiny SLIP's 192 x 65 tokens, 4 heads of 32, forward +
    backward: 51 -> 27 ms, PyTorch SDPA 36 ms; `python tools/benchmarks/layers.py --cases
    attention`).
    """
    return _softmax_attention_fwd(q, k, v, valid)[0]


def _softmax_attention_fwd(q, k, v, valid):
    scale = jnp.float32(q.shape[-1] ** -0.5)
    if q.dtype == jnp.float32:
        # Scaling q, not the [T, S] logits: XLA:CPU's fused dot + softmax otherwise reads the
        # scale from a materialised [B, heads, T, S] broadcast. Low-precision q is not
        # rounded again: its logits are scaled in float32.
        logits = jnp.einsum("bnth,bnsh->bnts", q * scale, k)
    else:
        logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if valid is not None:
        logits = jnp.where(valid, logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v)
    return out, (q, k, v, probs, out)


def _softmax_attention_bwd(residuals, d_out):
    q, k, v, probs, out = residuals
    scale = q.shape[-1] ** -0.5
    d_v = jnp.einsum("bnts,bnth->bnsh", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bnth,bnsh->bnts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = (probs * (d_probs - row)).astype(q.dtype)
    d_q = jnp.einsum("bnts,bnsh->bnth", d_logits, k) * jnp.asarray(scale, q.dtype)
    d_k = jnp.einsum("bnts,bnth->bnsh", d_logits, q) * jnp.asarray(scale, k.dtype)
    return d_q, d_k, d_v, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    implementation: str | None = None,
    pad_to: int | None = None,
) -> jax.Array:
    """Self-attention over [B, T, heads, head_dim]: `head_major_attention`, or cuDNN's kernel.

    cuDNN's fused kernel (`implementation="cudnn"`, through `jax.nn.dot_product_attention`)
    takes only some sequence lengths (ViT-B/16's 197 tokens are refused), so the tokens are
    zero-padded to a multiple of `pad_to` (default 64), the padded keys masked out by
    `key_value_seq_lengths`, and the padded queries dropped: the result equals unpadded
    attention. Any other `implementation` (None, "xla") is the head-major XLA form (padded
    only where `pad_to` asks, which tests the padding on CPU).
    """
    if pad_to is None:
        pad_to = 64 if implementation == "cudnn" else 1
    batch, length = q.shape[:2]
    extra = -length % pad_to
    if not extra and implementation != "cudnn":
        return head_major_attention(q, k, v, causal=causal)
    if not extra:
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=implementation
        )
    widths = ((0, 0), (0, extra), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    lengths = jnp.full((batch,), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    return out[:, :length]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (`qkv`) and an output `proj`.

    Kernels are stored as 2-D `[in, out]` matrices (the transpose of PyTorch's layout) so
    parameter counts and converted checkpoints match fused-qkv implementations exactly.
    """

    width: int
    heads: int
    causal: bool = False
    qkv_init: Initializer = TIMM_NORMAL
    proj_init: Initializer = TIMM_NORMAL
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        batch, length, _ = x.shape
        head_dim = self.width // self.heads
        qkv = TokenDense(
            3 * self.width,
            kernel_init=self.qkv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.heads, head_dim), 3, axis=2)
        out = attention(q, k, v, causal=self.causal, implementation=self.attention_impl)
        return TokenDense(
            self.width,
            kernel_init=self.proj_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(out.reshape(batch, length, self.width))


class Mlp(nn.Module):
    """Two-layer MLP `fc1 -> act -> fc2` with biases."""

    hidden: int
    act: Callable[[jax.Array], jax.Array] = gelu_exact
    fc1_init: Initializer = TIMM_NORMAL
    fc2_init: Initializer = TIMM_NORMAL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = lambda n, init, name: TokenDense(
            n, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = self.act(dense(self.hidden, self.fc1_init, "fc1")(x))
        return dense(width, self.fc2_init, "fc2")(x)


class Block(nn.Module):
    """Pre-LN residual block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    act: Callable[[jax.Array], jax.Array] = gelu_exact
    causal: bool = False
    qkv_init: Initializer = TIMM_NORMAL
    proj_init: Initializer = TIMM_NORMAL
    fc1_init: Initializer = TIMM_NORMAL
    fc2_init: Initializer = TIMM_NORMAL
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(
            epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = x + Attention(
            self.width,
            self.heads,
            causal=self.causal,
            qkv_init=self.qkv_init,
            proj_init=self.proj_init,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
        )(norm("norm1")(x))
        return x + Mlp(
            int(self.width * self.mlp_ratio),
            act=self.act,
            fc1_init=self.fc1_init,
            fc2_init=self.fc2_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(norm("norm2")(x))


class VisionTransformer(nn.Module):
    """ViT image encoder.

    `__call__(images [B, H, W, 3] float, train) -> {"feature": [B, width], "blocks": tuple,
    "grid": [B, H/p, W/p, width]}`.
    `feature` is the class token after the final norm (`pool="cls"`) or the mean of the patch
    tokens after the final norm (`pool="gap"`). `blocks[i]` is the class token (for "gap": the
    patch-token mean) of the residual stream after block i, before the final norm. `grid` is
    the patch tokens after the final norm in their image layout (spatial probes read it).
    `remat=True` rematerialises each block in the backward pass (less memory, ~30% more FLOPs).

    The defaults are timm's ViT (SLIP). OpenAI CLIP / open_clip ViTs (converted by
    `mmssl_jax.export.convert_torch`) set `ln_pre=True` (LayerNorm `ln_pre` after the position
    embedding), `patch_bias=False`, `ln_eps=1e-5` and `act="quick_gelu"` (OpenAI weights) or
    "gelu" (open_clip's own); their `ln_post` is `norm` and `proj` the model's image projection.
    """

    width: int = 128
    depth: int = 4
    heads: int = 4
    patch_size: int = 4
    image_size: int = 32
    mlp_ratio: float = 4.0
    pool: str = "cls"
    remat: bool = False
    ln_pre: bool = False
    patch_bias: bool = True
    ln_eps: float = 1e-6
    act: str = "gelu"
    attention_impl: str | None = None  # None (XLA) | "cudnn" (fused, GPU bf16)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        del train  # No dropout or batch statistics; kept for a uniform encoder signature.
        if self.pool not in ("cls", "gap"):
            raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {images.shape[1:3]}"
            )
        p = self.patch_size
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=self.patch_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(images)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.width)
        cls = self.param(
            "cls_token", nn.initializers.normal(1e-6), (1, 1, self.width), self.param_dtype
        )
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], 1)
        pos = self.param("pos_embed", TIMM_NORMAL, (1, *x.shape[1:]), self.param_dtype)
        x = x + pos.astype(x.dtype)
        norm = lambda name: nn.LayerNorm(
            epsilon=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        if self.ln_pre:
            x = norm("ln_pre")(x)

        pool = (lambda t: t[:, 0]) if self.pool == "cls" else (lambda t: t[:, 1:].mean(axis=1))
        block_cls = nn.remat(Block) if self.remat else Block
        blocks = []
        for i in range(self.depth):
            x = block_cls(
                self.width,
                self.heads,
                mlp_ratio=self.mlp_ratio,
                ln_eps=self.ln_eps,
                act=activation(self.act),
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x)
            blocks.append(pool(x))
        x = norm("norm")(x)
        side = self.image_size // p
        grid = x[:, 1:].reshape(batch, side, side, self.width)
        return {"feature": pool(x), "blocks": tuple(blocks), "grid": grid}

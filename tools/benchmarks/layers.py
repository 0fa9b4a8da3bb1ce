"""Layer benchmark: forward + backward of single layers, JAX layouts against PyTorch, one core.

    python tools/benchmarks/layers.py --out layers.json    (or python -m tools.benchmarks.layers)

Where the train-step benchmark (train.py) says how far a whole step is from PyTorch's, this
one says which layer the gap is in and what a layout change is worth. Each case times the
layer's output and its gradients with respect to the parameters and the input for a fixed
random cotangent g (`jax.vjp`; PyTorch: forward, then `backward(g)`), so each variant runs
its forward, its input-gradient and its weight-gradient dots. Variants:

- `dense`: a 128 -> 512 Dense over 192 x 65 tokens (tiny SLIP's fc1 over its three views at
  batch 64): `nn.Dense` on the 3-D [B, T, D] input (the layout before `TokenDense`),
  `models.vit.TokenDense` (2-D [B*T, D]), `torch.nn.Linear`.
- `attention`: softmax attention over the same tokens, 4 heads of 32:
  `jax.nn.dot_product_attention` (XLA path, [B, T, heads, hd]),
  `models.vit.head_major_attention` (and the same forward differentiated by XLA, the form
  before its hand-written backward), `torch.nn.functional.scaled_dot_product_attention`
  (as timm calls it: [B, heads, T, hd] views of the fused qkv).
- `layernorm`, `gelu`, `mlp`, `attention_layer`: the block's other pieces over the same
  tokens (`nn.LayerNorm` eps 1e-6; `models.vit.gelu_exact` and `jax.nn.gelu(approximate=
  False)` over the 512-wide hidden activations; `models.vit.Mlp`; `models.vit.Attention`
  with its qkv and output projections) against their PyTorch counterparts, so the block's
  gap can be split into its parts.
- `block`: tiny SLIP's whole pre-LN ViT block (`models.vit.Block`, width 128, 4 heads)
  against train.py's PyTorch twin (`torch_block`), and the same block with the GELU written
  as `jax.nn.gelu` (erfc; the form before `gelu_exact` used erf).
- `conv`: a 3 x 3, 32 -> 32 convolution over 128 images of 32 x 32 (the quick start's
  ResNet-10, `resnet10_32`, in its first stage), as `models.resnet` builds it (bias-free
  `nn.Conv`, NHWC) against `torch.nn.Conv2d` in channels-last; with `--threads 0` the
  row's `cpu_use` (CPU time / wall time) shows how many cores each framework's kernel keeps
  busy.
- `matmul_bf16`: a 12480 x 512 @ 512 x 512 matmul in float32 and in bfloat16 (bf16 output,
  and bf16 operands with float32 accumulation) against torch's float32 and bfloat16 matmul:
  GFLOP/s, which says whether a framework reaches this CPU's AMX units.

All variants of a case alternate in rounds (train.py's `alternate`) in one process pinned to
`--threads` cores (default 1); the headline is the median CPU time per call in ms, and
`vs_torch` = PyTorch time / variant time (> 1: faster than PyTorch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.benchmarks import train as train_bench  # noqa: E402
from tools.benchmarks.emit import emit  # noqa: E402

CASES = (
    "dense",
    "attention",
    "layernorm",
    "gelu",
    "mlp",
    "attention_layer",
    "block",
    "matmul_bf16",
    "conv",
)
# tiny SLIP at batch 64: three image views of 8 x 8 patches + the class token.
TOKENS = dict(batch=192, length=65, width=128, heads=4, hidden=512)
MATMUL = dict(m=12480, k=512, n=512)
# The quick start's ResNet-10 (resnet10_32) at batch 128: its first stage's 3 x 3 conv.
CONV = dict(batch=128, side=32, channels=32, kernel=3)


def _jax_grad_fn(apply: Callable, params, x, cotangent) -> Callable[[], None]:
    """A blocking call of jit(vjp(apply)(cotangent)): the output and the gradients w.r.t.
    params and x. The output is returned and the cotangent passed as an argument, so XLA can
    neither drop the forward nor fold the cotangent into constants (a loss linear in the
    output would let it do both)."""
    import jax

    def forward_backward(p, inp, g):
        out, pullback = jax.vjp(apply, p, inp)
        return out, pullback(g.astype(out.dtype))

    compiled = jax.jit(forward_backward).lower(params, x, cotangent).compile()
    return lambda: jax.block_until_ready(compiled(params, x, cotangent))


def _torch_grad_fn(module, inputs: Sequence, cotangent) -> Callable[[], None]:
    """A call of forward + backward of `module(*inputs)` against `cotangent`."""

    def call():
        for t in inputs:
            t.grad = None
        module.zero_grad(set_to_none=True)
        out = module(*inputs)
        out.backward(cotangent)

    return call


def dense_case(seed: int) -> dict[str, Callable[[], None]]:
    import flax.linen as nn
    import jax
    import numpy as np
    import torch

    from mmssl_jax.models.vit import TokenDense

    b, t, d, h = (TOKENS[k] for k in ("batch", "length", "width", "hidden"))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d), np.float32)
    g = rng.standard_normal((b, t, h), np.float32)
    fns = {}
    for name, layer in (("jax_dense_3d", nn.Dense(h)), ("jax_token_dense", TokenDense(h))):
        params = layer.init(jax.random.key(seed), x[:1])
        fns[name] = _jax_grad_fn(layer.apply, params, x, g)
    linear = torch.nn.Linear(d, h)
    tx = torch.from_numpy(x).requires_grad_()
    fns["torch_linear"] = _torch_grad_fn(linear, [tx], torch.from_numpy(g))
    return fns


def _autodiff_attention(q, k, v):
    """`head_major_attention`'s forward without its hand-written backward: XLA's derivative."""
    from mmssl_jax.models import vit

    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return vit._softmax_attention_fwd(q, k, v, None)[0].transpose(0, 2, 1, 3)


def _gelu_erfc(x):
    """The GELU as `jax.nn.gelu` writes it (erfc): `gelu_exact` before it used erf."""
    import jax

    return jax.nn.gelu(x, approximate=False)


def attention_case(seed: int) -> dict[str, Callable[[], None]]:
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmssl_jax.models.vit import head_major_attention

    b, t, d, heads = (TOKENS[k] for k in ("batch", "length", "width", "heads"))
    hd = d // heads
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((3, b, t, heads, hd), np.float32)
    g = rng.standard_normal((b, t, heads, hd), np.float32)
    fns = {
        "jax_dot_product_attention": _jax_grad_fn(
            lambda p, x: jax.nn.dot_product_attention(*x, implementation="xla"), {}, qkv, g
        ),
        "jax_head_major": _jax_grad_fn(lambda p, x: head_major_attention(*x), {}, qkv, g),
        "jax_head_major_autodiff": _jax_grad_fn(lambda p, x: _autodiff_attention(*x), {}, qkv, g),
    }
    tq = torch.from_numpy(qkv).requires_grad_()

    class SDPA(torch.nn.Module):
        def forward(self, x):  # [3, B, T, heads, hd] -> [B, T, heads, hd], timm's views
            q, k, v = x.transpose(2, 3)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    fns["torch_sdpa"] = _torch_grad_fn(SDPA(), [tq], torch.from_numpy(g))
    return fns


def _module_pair(jax_module, torch_module, in_width: int, out_width: int, seed: int):
    """The JAX and PyTorch forward + backward of two modules over the tokens."""
    import jax
    import numpy as np
    import torch

    b, t = TOKENS["batch"], TOKENS["length"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, in_width), np.float32)
    g = rng.standard_normal((b, t, out_width), np.float32)
    params = jax_module.init(jax.random.key(seed), x[:1])
    tx = torch.from_numpy(x).requires_grad_()
    return {
        "jax": _jax_grad_fn(jax_module.apply, params, x, g),
        "torch": _torch_grad_fn(torch_module, [tx], torch.from_numpy(g)),
    }


def layernorm_case(seed: int) -> dict[str, Callable[[], None]]:
    import flax.linen as nn
    import torch

    d = TOKENS["width"]
    return _module_pair(nn.LayerNorm(epsilon=1e-6), torch.nn.LayerNorm(d, eps=1e-6), d, d, seed)


def gelu_case(seed: int) -> dict[str, Callable[[], None]]:
    import flax.linen as nn
    import torch

    from mmssl_jax.models.vit import gelu_exact

    class Gelu(nn.Module):
        def __call__(self, x):
            return gelu_exact(x)

    class GeluErfc(nn.Module):
        def __call__(self, x):
            return _gelu_erfc(x)

    h = TOKENS["hidden"]
    fns = _module_pair(Gelu(), torch.nn.GELU(), h, h, seed)
    fns["jax_gelu_erfc"] = _module_pair(GeluErfc(), torch.nn.GELU(), h, h, seed)["jax"]
    return fns


def mlp_case(seed: int) -> dict[str, Callable[[], None]]:
    import torch

    from mmssl_jax.models.vit import Mlp

    d, h = TOKENS["width"], TOKENS["hidden"]
    twin = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.GELU(), torch.nn.Linear(h, d))
    return _module_pair(Mlp(h), twin, d, d, seed)


def attention_layer_case(seed: int) -> dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F

    from mmssl_jax.models.vit import Attention

    d, heads = TOKENS["width"], TOKENS["heads"]

    class TorchAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.proj = torch.nn.Linear(d, d)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v)
            return self.proj(a.transpose(1, 2).reshape(b, n, c))

    return _module_pair(Attention(d, heads), TorchAttention(), d, d, seed)


def block_case(seed: int) -> dict[str, Callable[[], None]]:
    import jax
    import numpy as np
    import torch

    from mmssl_jax.models.vit import Block

    b, t, d, heads = (TOKENS[k] for k in ("batch", "length", "width", "heads"))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, t, d), np.float32)
    g = rng.standard_normal((b, t, d), np.float32)
    block = Block(d, heads)
    params = block.init(jax.random.key(seed), x[:1])
    block_erfc = Block(d, heads, act=_gelu_erfc)
    twin = train_bench.torch_block(d, heads, 1e-6, torch.nn.GELU(), False)
    tx = torch.from_numpy(x).requires_grad_()
    return {
        "jax_block": _jax_grad_fn(block.apply, params, x, g),
        "jax_block_gelu_erfc": _jax_grad_fn(block_erfc.apply, params, x, g),
        "torch_block": _torch_grad_fn(twin, [tx], torch.from_numpy(g)),
    }


def conv_case(seed: int) -> dict[str, Callable[[], None]]:
    import jax
    import numpy as np
    import torch

    from mmssl_jax.models.resnet import _conv

    b, side, c, k = (CONV[n] for n in ("batch", "side", "channels", "kernel"))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, side, side, c), np.float32)
    g = rng.standard_normal((b, side, side, c), np.float32)
    layer = _conv(c, k, 1, "conv", jax.numpy.float32, jax.numpy.float32)
    params = layer.init(jax.random.key(seed), x[:1])
    fns = {"jax_conv": _jax_grad_fn(layer.apply, params, x, g)}
    channels_last = torch.channels_last
    conv = torch.nn.Conv2d(c, c, k, padding=k // 2, bias=False).to(memory_format=channels_last)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=channels_last)
    fns["torch_conv"] = _torch_grad_fn(conv, [tx.requires_grad_()], tg)
    return fns


def matmul_case(seed: int) -> dict[str, Callable[[], None]]:
    """Forward matmuls only (no gradient): what each dtype path sustains."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    m, k, n = (MATMUL[key] for key in ("m", "k", "n"))
    rng = np.random.default_rng(seed)
    a32 = rng.standard_normal((m, k), np.float32)
    b32 = rng.standard_normal((k, n), np.float32)
    a16, b16 = jnp.asarray(a32, jnp.bfloat16), jnp.asarray(b32, jnp.bfloat16)
    a32j, b32j = jnp.asarray(a32), jnp.asarray(b32)
    jobs = {
        "jax_float32": (jnp.dot, a32j, b32j),
        "jax_bf16": (jnp.dot, a16, b16),
        "jax_bf16_f32_accumulate": (
            lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32),
            a16,
            b16,
        ),
    }
    fns = {}
    for name, (fn, x, y) in jobs.items():
        compiled = jax.jit(fn).lower(x, y).compile()
        fns[name] = lambda c=compiled, x=x, y=y: jax.block_until_ready(c(x, y))
    ta32, tb32 = torch.from_numpy(a32), torch.from_numpy(b32)
    ta16, tb16 = ta32.bfloat16(), tb32.bfloat16()
    fns["torch_float32"] = lambda: torch.mm(ta32, tb32)
    fns["torch_bf16"] = lambda: torch.mm(ta16, tb16)
    return fns


BUILDERS: dict[str, Callable[[int], dict[str, Callable[[], None]]]] = {
    "dense": dense_case,
    "attention": attention_case,
    "layernorm": layernorm_case,
    "gelu": gelu_case,
    "mlp": mlp_case,
    "attention_layer": attention_layer_case,
    "block": block_case,
    "matmul_bf16": matmul_case,
    "conv": conv_case,
}
TORCH_REFERENCE = {
    "dense": "torch_linear",
    "attention": "torch_sdpa",
    "layernorm": "torch",
    "gelu": "torch",
    "mlp": "torch",
    "attention_layer": "torch",
    "block": "torch_block",
    "matmul_bf16": "torch_float32",
    "conv": "torch_conv",
}


def run_case(name: str, args) -> dict[str, Any]:
    """Times every variant of one case, alternating; returns its JSON row."""
    fns = BUILDERS[name](args.seed)
    wall, cpu = train_bench.alternate(fns, args.rounds, args.per_round)
    times = cpu if args.threads_used == 1 else wall
    ms = {k: 1e3 * train_bench._median(v) for k, v in times.items()}
    reference = ms[TORCH_REFERENCE[name]]
    row: dict[str, Any] = {
        "case": name,
        "ms": ms,
        "wall_ms": {k: 1e3 * train_bench._median(v) for k, v in wall.items()},
        # cores kept busy: CPU time over wall time, summed over all calls
        "cpu_use": {k: sum(cpu[k]) / sum(wall[k]) for k in wall},
        "vs_torch": {k: reference / v for k, v in ms.items()},
    }
    if name == "matmul_bf16":
        flops = 2.0 * MATMUL["m"] * MATMUL["k"] * MATMUL["n"]
        row["gflop_per_s"] = {k: flops / (v * 1e-3) / 1e9 for k, v in ms.items()}
    return row


def run(args) -> dict[str, Any]:
    """Runs the requested cases; returns the JSON document."""
    args.threads_used = train_bench.set_threads(args.threads)
    import jax
    import torch

    torch.set_num_threads(args.threads_used)
    started = time.time()
    rows = [run_case(name, args) for name in args.cases]
    return {
        "benchmark": "layers_vs_pytorch",
        "threads": args.threads_used,
        "timing": "CPU time per call" if args.threads_used == 1 else "wall time per call",
        "shapes": dict(tokens=TOKENS, matmul=MATMUL, conv=CONV),
        "machine": train_bench.machine(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "seconds": time.time() - started,
        "cases": {row["case"]: row for row in rows},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--rounds", type=int, default=5, help="alternation rounds")
    p.add_argument("--per_round", type=int, default=3, help="calls per variant per round")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="cores to pin to (0: all available); 1 gives load-robust CPU-time numbers",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()

"""Train-step benchmark: mmssl_jax's jitted SLIP step against a PyTorch model of the same dims.

    python tools/benchmarks/train.py --out train.json      (or python -m tools.benchmarks.train)

Cases (dims from configs/ and mmssl_jax/models/registry.py, nothing copied by hand):
- `tiny_slip`: configs/tiny_slip.py (ViT w128 d4 p4 at 32 px, text w128 d4 ctx 32, SimCLR head
  512-512-128 with LayerNorm), batch 64 (the config trains at 256; same dims, 4x shorter).
- `vits_slip`: configs/slip_vits.py (ViT-S/16 at 224 px, CLIP text w512 d12 ctx 77 vocab
  49408, SimCLR head 4096-4096-256 with BatchNorm), batch 8.

JAX: `step_lib.make_train_step` (the Trainer's step: device augmentation of the two uint8 SSL
views, one encoder pass over all image views, CLIP + SimCLR terms under shard_map on a
1-device mesh, AdamW, logit-scale clamp, non-finite guard) jitted with donation, on
synthetic uint8 images / int32 tokens already on the device (the input pipeline is
benchmarked separately).

PyTorch: hand-built modules of the same dims (timm-style pre-LN ViT with fused qkv and
`scaled_dot_product_attention`, CLIP's causal text transformer with QuickGELU and EOS
pooling, bias-free projections, SLIP's SimCLR MLP), SLIP's forward (three image passes:
image, aug1, aug2), CLIP + SimCLR loss as SLIP's `CLIPLoss`/`SIMCLRLoss`, `torch.optim.AdamW`
(no decay on ndim < 2) and the logit-scale clamp. Its inputs are float NCHW tensors that
are already augmented (SLIP augments in its data loader), so the JAX step does strictly
more work (the photometric augmentation, reported separately in the breakdown).

Both run in this process on the same cores: `--threads N` (default 1) pins the process to N
cores before JAX or torch start; torch gets `set_num_threads(N)` and XLA sizes its pool from
the same affinity. They alternate in rounds so that load from other processes hits both
alike. The headline is the median step time in CPU seconds of this process when N = 1 (the
work done, robust to a busy machine; wall time is reported too) and in wall seconds when
N > 1 (CPU time would count spinning thread pools); `ratio` = JAX img/s / PyTorch img/s.
FLOPs are XLA's cost analysis of the compiled JAX step (the PyTorch model does the same
matmuls, less the augmentation), so GFLOP/s are comparable. With `--breakdown`, both are
also timed for the forward, forward + backward, and (JAX) the augmentation alone (noisy on a
busy machine). `--profile N` traces N more JAX steps with `jax.profiler` and sums the ops'
time by kind (`profile_ms_per_step`). `--xla_options` times the JAX step again compiled with
XLA:CPU options (e.g. xla_cpu_prefer_vector_width=512), alternating with the rest. The notes
say where the time goes; the comment above `machine()` says why JAX is slower on CPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mmssl_jax.parallel import allocator  # noqa: E402
from tools.benchmarks.emit import emit  # noqa: E402

CASES: dict[str, dict[str, Any]] = {
    "tiny_slip": dict(config="tiny_slip", batch=64, vocab=4000),
    "vits_slip": dict(config="slip_vits", batch=8, vocab=49408),
    # CPU smoke sizes for tests of this tool.
    "smoke_slip": dict(config="tiny_slip", batch=16, vocab=512),
}


# ----------------------------------------------------------------------------------------
# Shared setup


def set_threads(threads: int | None) -> int:
    """Pins this process to `threads` cores (before JAX/torch start); returns the count."""
    if hasattr(os, "sched_getaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if threads and threads < len(cores):
            os.sched_setaffinity(0, set(cores[:threads]))
        return len(os.sched_getaffinity(0))
    return threads or os.cpu_count() or 1


def case_config(name: str, batch: int | None = None, vocab: int | None = None):
    """The config of a case, with its batch size and vocabulary size filled in."""
    import importlib

    spec = CASES[name]
    config = importlib.import_module(f"configs.{spec['config']}").get_config()
    config.model.vocab_size = int(vocab or spec["vocab"])
    config.train.batch_size = int(batch or spec["batch"])
    if name == "smoke_slip":
        config.model.image_overrides = {"depth": 1}
        config.model.text_overrides = {"layers": 1}
        config.model.ssl_head = dict(hidden=64, out=32, norm="layer")
    return config


def model_dims(config) -> dict[str, Any]:
    """Every dimension the PyTorch twin needs, read from the config and the model table."""
    from mmssl_jax.models import registry

    image = dict(registry.IMAGE_ENCODERS[config.model.image_encoder][1])
    image.update(dict(config.model.get("image_overrides") or {}))
    text = dict(registry.TEXT_ENCODERS[config.model.text_encoder][1])
    text.update(dict(config.model.get("text_overrides") or {}))
    text["context_length"] = int(config.model.context_length)
    return dict(
        image=image,
        text=text,
        vocab=int(config.model.vocab_size),
        embed_dim=int(config.model.embed_dim),
        head=dict(config.model.ssl_head),
        image_size=int(config.data.image_size),
        batch=int(config.train.batch_size),
        lr=float(config.optim.lr),
        weight_decay=float(config.optim.weight_decay),
        betas=(float(config.optim.b1), float(config.optim.b2)),
        eps=float(config.optim.eps),
        temperature=float(config.objective_options.simclr.temperature),
        ssl_scale=float(dict(config.objectives)["simclr"]),
    )


def synthetic_tokens(rng, batch: int, length: int, vocab: int):
    """int32 [B, L]: random ids in [4, vocab), EOS (3) after the last, then 0 padding."""
    import numpy as np

    tokens = np.zeros((batch, length), np.int32)
    lengths = rng.integers(4, length + 1, size=batch)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = rng.integers(4, vocab, size=n - 1)
        tokens[i, n - 1] = 3
    return tokens


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------------------
# JAX


class JaxStep:
    """The Trainer's jitted train step on a synthetic batch; `__call__()` runs one step."""

    def __init__(self, config, seed: int = 0, compiler_options: dict | None = None):
        import jax
        import numpy as np

        from mmssl_jax.models.registry import build_model
        from mmssl_jax.parallel import mesh as parallel
        from mmssl_jax.training import optim
        from mmssl_jax.training import state as state_lib
        from mmssl_jax.training import step as step_lib

        self.jax = jax
        self.config = config
        self.model = build_model(config.model)
        self.tx, _ = optim.make_optimizer(config.optim, total_steps=10_000, steps_per_epoch=1_000)
        self.specs = step_lib.term_specs(config)
        self.mesh = parallel.make_mesh(1)
        self.aug_cfg = step_lib.augment_configs(config)
        size, length = int(config.data.image_size), int(config.model.context_length)
        batch = int(config.train.batch_size)
        rng = np.random.default_rng(seed)
        keys = step_lib.batch_keys_for(self.specs)
        host = {"index": np.arange(batch, dtype=np.int32)}
        for k in ("image", "view_a", "view_b"):
            if k in keys:
                host[k] = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        if "tokens" in keys:
            host["tokens"] = synthetic_tokens(rng, batch, length, int(config.model.vocab_size))
        self.batch = jax.device_put(host)
        init = functools.partial(state_lib.init_state, self.model, self.tx, size, length)
        self._init = jax.jit(init)
        self.seed = seed
        self.state = self._init(seed)
        step = step_lib.make_train_step(self.model, self.tx, self.specs, self.mesh, self.aug_cfg)
        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=0).lower(self.state, self.batch)
        self.compiled = lowered.compile(compiler_options=compiler_options or None)
        self.compile_s = time.perf_counter() - t0
        self.flops = _flops(self.compiled, lowered)

    def step(self):
        """One step, dispatched asynchronously; returns its metrics (device arrays)."""
        self.state, metrics = self.compiled(self.state, self.batch)
        return metrics

    def __call__(self) -> None:
        metrics = self.step()
        self.jax.block_until_ready(metrics["loss"])
        self.last_loss = float(metrics["loss"])

    def parts(self) -> dict[str, Callable[[], None]]:
        """Jitted pieces for the breakdown: augmentation only, forward, forward + backward."""
        jax = self.jax
        from input_pipeline import augment
        from mmssl_jax import objectives
        from mmssl_jax.objectives import outputs as outputs_lib

        model, specs, mesh, aug_cfg = self.model, self.specs, self.mesh, self.aug_cfg

        needed = sorted(objectives.needed_inputs(list(specs)))
        compute = functools.partial(outputs_lib.compute, names=needed)

        def forward(params, batch_stats, batch, key):
            variables = {"params": params}
            if batch_stats:
                variables["batch_stats"] = batch_stats
            outputs, _ = model.apply(
                variables, batch, key, aug_cfg, True, method=compute, mutable=True
            )
            return objectives.total_loss(specs, outputs, mesh)[0]

        def aug(batch, key):
            cfgs = aug_cfg if isinstance(aug_cfg, tuple) else (aug_cfg, aug_cfg)
            return [
                augment.ssl_augment(batch[v], jax.random.fold_in(key, i), batch["index"], cfgs[i])
                for i, v in enumerate(("view_a", "view_b"))
                if v in batch
            ]

        key = jax.random.key(0)
        state = self._init(self.seed)
        args = (state.params, state.batch_stats, self.batch, key)
        fns = {
            "augment": (jax.jit(aug), (self.batch, key)),
            "forward": (jax.jit(forward), args),
            "forward_backward": (jax.jit(jax.value_and_grad(forward)), args),
        }
        out = {}
        for name, (fn, fargs) in fns.items():
            compiled = fn.lower(*fargs).compile()
            out[name] = functools.partial(_run_blocking, jax, compiled, fargs)
        return out


def _run_blocking(jax, fn, args) -> None:
    jax.block_until_ready(fn(*args))


def _flops(compiled, lowered) -> float | None:
    """FLOPs of one step from XLA's cost analysis (compiled module, else the lowered one)."""
    for obj in (compiled, lowered):
        try:
            cost = obj.cost_analysis()
        except Exception:  # some backends do not implement it
            continue
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        if cost and cost.get("flops", 0) > 0:
            return float(cost["flops"])
    return None


# ----------------------------------------------------------------------------------------
# PyTorch


def torch_block(width: int, heads: int, eps: float, act, causal: bool):
    """A pre-LN transformer block (timm's ViT block, CLIP's residual block) as torch modules:
    fused qkv, `scaled_dot_product_attention`, MLP ratio 4."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(width, eps=eps)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, eps=eps)
            self.fc1 = nn.Linear(width, 4 * width)
            self.fc2 = nn.Linear(4 * width, width)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, c // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
            return x + self.fc2(act(self.fc1(self.norm2(x))))

    return Block()


def torch_slip(dims: dict[str, Any]):
    """SLIP's model (`SLIP` in SLIP's models.py) with the given dims, as plain torch modules."""
    import torch
    from torch import nn

    def quick_gelu(x):
        return x * torch.sigmoid(1.702 * x)

    class VisionTransformer(nn.Module):
        def __init__(self, width, depth, heads, patch_size, image_size, **_):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, width, patch_size, patch_size)
            n = (image_size // patch_size) ** 2 + 1
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_embed = nn.Parameter(torch.randn(1, n, width) * 0.02)
            gelu = nn.GELU()
            self.blocks = nn.ModuleList(
                [torch_block(width, heads, 1e-6, gelu, False) for _ in range(depth)]
            )
            self.norm = nn.LayerNorm(width, eps=1e-6)

        def forward(self, images):
            x = self.patch_embed(images).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
            for block in self.blocks:
                x = block(x)
            return self.norm(x)[:, 0]

    class TextTransformer(nn.Module):
        def __init__(self, vocab, width, layers, heads, context_length, **_):
            super().__init__()
            self.token_embedding = nn.Embedding(vocab, width)
            self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
            self.resblocks = nn.ModuleList(
                [torch_block(width, heads, 1e-5, quick_gelu, True) for _ in range(layers)]
            )
            self.ln_final = nn.LayerNorm(width, eps=1e-5)

        def forward(self, tokens):
            x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
            for block in self.resblocks:
                x = block(x)
            x = self.ln_final(x)
            eos = ((tokens != 0).sum(-1) - 1).clamp(min=0)
            return x[torch.arange(x.shape[0]), eos]

    def norm(kind, n):
        return {"batch": nn.BatchNorm1d(n), "layer": nn.LayerNorm(n)}.get(kind, nn.Identity())

    class SLIP(nn.Module):
        def __init__(self):
            super().__init__()
            img, txt, head = dims["image"], dims["text"], dims["head"]
            self.visual = VisionTransformer(**img)
            self.transformer = TextTransformer(dims["vocab"], **txt)
            e = dims["embed_dim"]
            self.image_projection = nn.Parameter(
                torch.randn(img["width"], e) * img["width"] ** -0.5
            )
            self.text_projection = nn.Parameter(torch.randn(txt["width"], e) * txt["width"] ** -0.5)
            self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
            hidden, out, kind = head["hidden"], head["out"], head.get("norm", "batch")
            self.image_mlp = nn.Sequential(
                nn.Linear(img["width"], hidden),
                norm(kind, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, hidden),
                norm(kind, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out),
            )

        def forward(self, image, text, aug1, aug2):
            image_embed = self.visual(image) @ self.image_projection
            text_embed = self.transformer(text) @ self.text_projection
            aug1_embed = self.image_mlp(self.visual(aug1))
            aug2_embed = self.image_mlp(self.visual(aug2))
            return image_embed, text_embed, aug1_embed, aug2_embed, self.logit_scale.exp()

    return SLIP()


def torch_slip_loss(outputs, temperature: float, ssl_scale: float):
    """SLIP's CLIPLoss + ssl_scale * SIMCLRLoss on one device."""
    import torch
    import torch.nn.functional as F

    image_embed, text_embed, q_a, q_b, scale = outputs
    image_embed, text_embed = F.normalize(image_embed, dim=-1), F.normalize(text_embed, dim=-1)
    n = image_embed.shape[0]
    labels = torch.arange(n, device=image_embed.device)
    logits = scale * image_embed @ text_embed.t()
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    q_a, q_b = F.normalize(q_a, dim=-1), F.normalize(q_b, dim=-1)
    masks = F.one_hot(labels, n) * 1e9
    aa = q_a @ q_a.t() / temperature - masks
    bb = q_b @ q_b.t() / temperature - masks
    ab = q_a @ q_b.t() / temperature
    ba = q_b @ q_a.t() / temperature
    ssl = (
        F.cross_entropy(torch.cat([ab, aa], 1), labels)
        + F.cross_entropy(torch.cat([ba, bb], 1), labels)
    ) / 2
    return clip + ssl_scale * ssl


class TorchStep:
    """SLIP's training step in PyTorch; `__call__()` runs one step and waits for it.

    fp32 by default; `amp_dtype=torch.bfloat16` runs the forward and loss under autocast
    (PyTorch AMP: matmuls in bf16, parameters and optimizer in fp32), as SLIP does with fp16.
    """

    def __init__(
        self,
        dims: dict[str, Any],
        threads: int | None,
        seed: int = 0,
        device: str = "cpu",
        amp_dtype: Any = None,
    ):
        import numpy as np
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.dims, self.device, self.amp_dtype = dims, device, amp_dtype
        self.model = torch_slip(dims).to(device).train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": dims["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=dims["lr"],
            betas=dims["betas"],
            eps=dims["eps"],
        )
        rng = np.random.default_rng(seed)
        b, s = dims["batch"], dims["image_size"]
        images = [torch.randn(b, 3, s, s, device=device) for _ in range(3)]
        tokens = synthetic_tokens(rng, b, dims["text"]["context_length"], dims["vocab"])
        tokens = torch.from_numpy(tokens).long().to(device)
        self.inputs = (images[0], tokens, images[1], images[2])
        self.params = sum(p.numel() for p in self.model.parameters())

    def loss(self):
        with self.torch.autocast(
            self.device.split(":")[0],
            dtype=self.amp_dtype,
            enabled=self.amp_dtype is not None,
        ):
            outputs = self.model(*self.inputs)
            outputs = tuple(o.float() for o in outputs)
        return torch_slip_loss(outputs, self.dims["temperature"], self.dims["ssl_scale"])

    def step(self):
        """One step, queued on the device; returns the loss tensor."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss()
        loss.backward()
        self.opt.step()
        with self.torch.no_grad():
            self.model.logit_scale.clamp_(0, 4.6052)
        return loss

    def __call__(self) -> None:
        self.last_loss = self.step().item()

    def parts(self) -> dict[str, Callable[[], None]]:
        def forward():
            self.loss()

        def forward_backward():
            self.opt.zero_grad(set_to_none=True)
            self.loss().backward()

        return {"forward": forward, "forward_backward": forward_backward}


# ----------------------------------------------------------------------------------------
# Timing


def alternate(
    fns: dict[str, Callable[[], None]], rounds: int, per_round: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, CPU) seconds per call of each fn, alternating fns every `per_round` calls
    (rotating the order each round) so that outside load hits all alike. One warm-up call
    each. CPU time is this process's (all threads), so on one pinned core it is the work
    done, unaffected by other processes' load."""
    names = list(fns)
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return wall, cpu


def torch_dtype(name: str):
    """The torch dtype called `name` (imported late: torch starts after the pinning)."""
    import torch

    return getattr(torch, name)


def run_case(name: str, args) -> dict:
    """Times one case (JAX and PyTorch alternating); returns its JSON row."""
    spec = CASES[name]
    rounds = args.rounds or (3 if spec["batch"] <= 16 and name != "smoke_slip" else 4)
    per_round = args.per_round or (1 if name == "vits_slip" else 3)
    config = case_config(name, args.batch.get(name), None)
    config.model.dtype = args.dtype
    dims = model_dims(config)
    batch = dims["batch"]

    t0 = time.perf_counter()
    jax_step = JaxStep(config, seed=args.seed)
    setup_s = time.perf_counter() - t0
    amp = {"float32": None, "bfloat16": torch_dtype("bfloat16")}[args.dtype]
    torch_step = TorchStep(dims, args.threads_used, seed=args.seed, amp_dtype=amp)
    fns: dict[str, Callable[[], None]] = {"jax": jax_step, "torch": torch_step}
    variants = {}
    for opt in args.xla_options:
        key, _, value = opt.partition("=")
        parsed = {"true": True, "false": False}.get(value.lower(), value)
        step = JaxStep(config, seed=args.seed, compiler_options={key: parsed})
        variants[f"jax[{opt}]"] = step
        fns[f"jax[{opt}]"] = step
    wall, cpu = alternate(fns, rounds, per_round)
    # One core: CPU seconds are the work done, robust to other processes. Several cores:
    # wall clock (CPU time would count idle spinning of thread pools).
    clock = "cpu" if args.threads_used == 1 else "wall"
    times = cpu if clock == "cpu" else wall

    def summary(name: str, flops: float | None) -> dict:
        step = _median(times[name])
        row = {
            "step_s": step,
            "img_per_s": batch / step,
            "wall_step_s": _median(wall[name]),
            "cpu_step_s": _median(cpu[name]),
            "wall_step_s_all": wall[name],
            "cpu_step_s_all": cpu[name],
        }
        if flops:
            row["gflop_per_s"] = flops / step / 1e9
        return row

    import jax
    import numpy as np

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax_step.state.params))
    row: dict[str, Any] = {
        "case": name,
        "config": spec["config"],
        "clock": clock,
        "dtype": args.dtype,
        "batch": batch,
        "image_size": dims["image_size"],
        "dims": {k: dims[k] for k in ("image", "text", "vocab", "embed_dim", "head")},
        "params_jax": n_params,
        "params_torch": torch_step.params,
        "flops_per_step_xla": jax_step.flops,
        "jax": {
            **summary("jax", jax_step.flops),
            "compile_s": jax_step.compile_s,
            "setup_s": setup_s,
            "loss": jax_step.last_loss,
        },
        "torch": {**summary("torch", jax_step.flops), "loss": torch_step.last_loss},
    }
    row["ratio"] = row["jax"]["img_per_s"] / row["torch"]["img_per_s"]
    if variants:
        row["xla_options"] = {
            k: {**summary(k, v.flops), "compile_s": v.compile_s, "loss": v.last_loss}
            for k, v in variants.items()
        }
        for v in row["xla_options"].values():
            v["ratio_vs_torch"] = v["img_per_s"] / row["torch"]["img_per_s"]
            v["speedup_vs_default"] = row["jax"]["step_s"] / v["step_s"]
    if args.breakdown:
        jp, tp = jax_step.parts(), torch_step.parts()
        parts = {f"jax/{k}": f for k, f in jp.items()}
        parts.update({f"torch/{k}": f for k, f in tp.items()})
        pwall, pcpu = alternate(parts, max(2, rounds - 1), per_round)
        ptimes = pcpu if clock == "cpu" else pwall
        row["breakdown_s"] = {k: _median(v) for k, v in ptimes.items()}
        row["breakdown_s"]["jax/step"] = row["jax"]["step_s"]
        row["breakdown_s"]["torch/step"] = row["torch"]["step_s"]
    if args.profile:
        row["profile_ms_per_step"] = profile_ops(jax_step, args.profile)
    row["notes"] = explain(row)
    del jax_step, torch_step, variants
    return row


def profile_ops(step: JaxStep, steps: int, top: int = 20) -> dict[str, float]:
    """ms per step of the compiled step's ops, summed by kind (an HLO name without its `.N`:
    `dot`, `ynn_fusion`, `multiply_erf_fusion`, ...), largest first, from a `jax.profiler`
    trace of `steps` steps. Says where the step's time goes without reading a trace viewer."""
    import collections
    import glob
    import gzip
    import json
    import re
    import tempfile

    jax = step.jax
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                step()
        (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    # Host-side events (Python frames, the executor's own spans) are not ops.
    skip = ("$", "Pjit", "CommonPjRt")
    kinds: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(skip) and "Thunk" not in name:
            kinds[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0) / 1e3 / steps
    out = dict(kinds.most_common(top))
    out["all_ops"] = sum(kinds.values())
    return out


def explain(row: dict) -> list[str]:
    """Plain-language reading of the numbers (where the time goes, why we are slower)."""
    notes = []
    ratio = row["ratio"]
    notes.append(
        f"{row['case']}: JAX {row['jax']['img_per_s']:.1f} img/s vs PyTorch "
        f"{row['torch']['img_per_s']:.1f} img/s (ratio {ratio:.2f}x)."
    )
    b = row.get("breakdown_s")
    if b:
        j_aug = b.get("jax/augment", 0.0)
        j_fwd, t_fwd = b["jax/forward"], b["torch/forward"]
        j_fb, t_fb = b["jax/forward_backward"], b["torch/forward_backward"]
        j_step, t_step = b["jax/step"], b["torch/step"]
        notes.append(
            f"JAX: augmentation {j_aug:.3f}s of forward {j_fwd:.3f}s; backward "
            f"{j_fb - j_fwd:.3f}s; optimizer + guards {j_step - j_fb:.3f}s."
        )
        notes.append(
            f"PyTorch: forward {t_fwd:.3f}s; backward {t_fb - t_fwd:.3f}s; AdamW "
            f"{t_step - t_fb:.3f}s (its inputs come pre-augmented)."
        )
        enc = j_fwd - j_aug
        if enc > 0:
            notes.append(
                f"Encoders + loss forward without augmentation: JAX {enc:.3f}s vs PyTorch "
                f"{t_fwd:.3f}s ({t_fwd / enc:.2f}x); JAX step without augmentation would be "
                f"~{row['batch'] / max(j_step - j_aug, 1e-9):.1f} img/s "
                f"({t_step / max(j_step - j_aug, 1e-9):.2f}x PyTorch)."
            )
    for name, v in (row.get("xla_options") or {}).items():
        notes.append(f"{name}: {v['speedup_vs_default']:.2f}x the default JAX step.")
    if ratio < 1.0 and row["jax"].get("gflop_per_s"):
        notes.append(
            f"Same FLOPs ({row['flops_per_step_xla'] / 1e9:.0f} GFLOP/step by XLA's count): JAX "
            f"sustains {row['jax']['gflop_per_s']:.0f} GFLOP/s, PyTorch "
            f"{row['torch']['gflop_per_s']:.0f} GFLOP/s."
        )
    return notes


# Where JAX's CPU time went (JAX 0.10.2 / torch 2.13; 2-core Sapphire Rapids, then AMD EPYC):
# matmuls are most of both steps. XLA:CPU runs the forward and input-gradient matmuls as YNNPACK
# fusions and the weight gradients as oneDNN sgemm calls (`ONEDNN_VERBOSE=1` shows `gemm_api`).
# Fixed in the model code: Dense layers over 3-D [B, T, D] operands (XLA copied the output
# gradient into a transposed layout; `models.vit.TokenDense`), attention einsums over
# [B, T, heads, hd] and XLA's derivative of the softmax (`models.vit.head_major_attention`, a
# hand-written backward), the erfc GELU (`models.vit.gelu_exact`). Fixed in the process: glibc's
# malloc maps and unmaps the step's large buffers every step, so each step page-faults them in
# again (ViT-S/16: 1.8 of 6.7 s in the kernel); under tcmalloc (`machine()["allocator"]`,
# `mmssl_jax.parallel.allocator`) JAX's step is 1.45x (tiny SLIP) and 1.77x (ViT-S/16)
# PyTorch's. The oneDNN fusion route (--xla_cpu_experimental_onednn_fusion_type=dot with ynn
# fusions off) runs oneDNN graph matmuls (ONEDNN_VERBOSE) but measured 10% slower; the onednn
# custom call flag emits nothing on this runtime; YNN fusion of dots only
# (xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT) 0.98x the default. bf16
# (AMX): XLA:CPU's bf16-output dots miss the AMX kernels (56 vs 320 GFLOP/s with float32
# accumulation), so `model.dtype=bfloat16` is no faster than float32 there (--dtype bfloat16).


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # Both frameworks share this process's allocator (mmssl_jax.parallel.allocator: the
        # main command runs under tcmalloc when installed; LD_PRELOAD gives it to this one).
        "allocator": allocator.loaded(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def run(args) -> dict:
    """Runs the requested cases; returns the JSON document."""
    args.threads_used = set_threads(args.threads)
    import jax
    import torch

    started = time.time()
    rows = [run_case(name, args) for name in args.cases]
    return {
        "benchmark": "train_step_vs_pytorch",
        "threads": args.threads_used,
        "machine": machine(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.time() - started,
        "cases": {row["case"]: row for row in rows},
        "ratios": {row["case"]: row["ratio"] for row in rows},
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["tiny_slip", "vits_slip"])
    p.add_argument(
        "--batch",
        nargs="*",
        default=[],
        metavar="CASE=N",
        help="override a case's batch size, e.g. tiny_slip=128",
    )
    p.add_argument("--rounds", type=int, default=0, help="alternation rounds (0: per case)")
    p.add_argument("--per_round", type=int, default=0, help="steps per slot (0: per case)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="cores to pin to (0: all available); 1 gives load-robust CPU-time numbers",
    )
    p.add_argument("--breakdown", action="store_true", help="also time forward / backward")
    p.add_argument(
        "--xla_options",
        nargs="*",
        default=[],
        metavar="OPTION=VALUE",
        help="also time the JAX step compiled with these XLA options, one variant each",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype: JAX model.dtype (params float32), PyTorch autocast (AMP)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also trace STEPS JAX steps with jax.profiler: ms per step by op kind",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.batch = {k: int(v) for k, v in (item.split("=", 1) for item in args.batch)}
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    return emit(run(args), args.out)


if __name__ == "__main__":
    main()

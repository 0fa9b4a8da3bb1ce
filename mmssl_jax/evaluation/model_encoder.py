"""Jitted, batched encoders over a trained model: what evaluation and exports call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline import augment
from mmssl_jax.models.model import MultimodalModel, l2_normalize


class ModelEncoder:
    """`image_features(uint8 images)` and `text_embeddings(texts)` for a model + variables.

    Images must already be at the model's input size (the evaluation pipeline resizes and
    center-crops); features come back as float32 numpy, embeddings L2-normalised.
    `with_blocks` adds "block_{i}"; each g of `grids` adds "grid{g}", the tower's spatial map
    average-pooled to g x g cells and flattened (a probe that sees where things are).
    """

    def __init__(
        self,
        model: MultimodalModel,
        variables: dict[str, Any],
        tokenizer: Any = None,
        text_length: int = 77,
        batch_size: int = 256,
        with_blocks: bool = False,
        mesh: Any = None,
        grids: Sequence[int] = (),
    ):
        self.model, self.variables = model, variables
        self.tokenizer, self.text_length = tokenizer, text_length
        self.batch_size, self.with_blocks = batch_size, with_blocks
        self.mesh = mesh  # the training mesh: evaluators that train (finetune) shard over it
        self.grids = tuple(int(g) for g in grids)
        self.has_text = tokenizer is not None and model.text_encoder is not None
        self._images = jax.jit(self._image_fn)
        self._texts = jax.jit(self._text_fn)

    def _image_fn(self, variables, images):
        x = augment.normalize(augment.to_float(images))
        out = self.model.apply(variables, x, False, method=MultimodalModel.encode_image)
        feats = {"emb": l2_normalize(out["emb"]), "feature": out["feature"].astype(jnp.float32)}
        if self.with_blocks:
            for i, block in enumerate(out["blocks"]):
                feats[f"block_{i}"] = block.astype(jnp.float32)
        for cells in self.grids if "grid" in out else ():  # else resolve_layers logs it
            feats[f"grid{cells}"] = grid_pool(out["grid"], cells).astype(jnp.float32)
        return feats

    def _text_fn(self, variables, tokens):
        out = self.model.apply(variables, tokens, False, method=MultimodalModel.encode_text)
        return l2_normalize(out["emb"])

    def image_features(self, images: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [
            jax.device_get(
                self._images(self.variables, _pad(images[i : i + self.batch_size], self.batch_size))
            )
            for i in range(0, len(images), self.batch_size)
        ]
        return {k: np.concatenate([c[k] for c in chunks])[: len(images)] for k in chunks[0]}

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None or self.model.text_encoder is None:
            raise ValueError("this encoder has no text tower")
        tokens = self.tokenizer.encode(list(texts), self.text_length)
        chunks = [
            np.asarray(
                self._texts(self.variables, _pad(tokens[i : i + self.batch_size], self.batch_size))
            )
            for i in range(0, len(tokens), self.batch_size)
        ]
        return np.concatenate(chunks)[: len(texts)]

    @property
    def logit_scale(self) -> float:
        return float(np.exp(self.variables["params"]["logit_scale"]))


def grid_pool(grid: jax.Array, cells: int) -> jax.Array:
    """[B, h, w, C] -> [B, cells * cells * C]: adaptive average pooling to cells x cells,
    flattened row-major. Cell i spans rows floor(i h / cells) to ceil((i + 1) h / cells), as
    PyTorch's adaptive_avg_pool2d splits them, so any map size works (14 x 14 -> 4 x 4 cells
    overlap by a row; a map smaller than the grid repeats its values)."""
    if cells < 1:
        raise ValueError(f"layer grid{cells}: the cell count must be at least 1")
    b, h, w, c = grid.shape
    pooled = jnp.einsum("ih,bhwc,jw->bijc", _pool_matrix(h, cells), grid, _pool_matrix(w, cells))
    return pooled.reshape(b, cells * cells * c)


def _pool_matrix(size: int, cells: int) -> np.ndarray:
    """[cells, size]: row i averages the positions of cell i (adaptive pooling's spans)."""
    out = np.zeros((cells, size), np.float32)
    for i in range(cells):
        start, stop = (i * size) // cells, -((-(i + 1) * size) // cells)
        out[i, start:stop] = 1.0 / (stop - start)
    return out


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the last chunk to the batch size so every call reuses one compiled shape."""
    if len(x) == size:
        return x
    pad = np.zeros((size - len(x), *x.shape[1:]), x.dtype)
    return np.concatenate([x, pad])

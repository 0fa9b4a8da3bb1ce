"""ModelEncoder's spatial readout: "grid{g}" layers pool the tower's map into g x g cells."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from input_pipeline import augment
from mmssl_jax.evaluation.context import grid_sizes, layer_sources, wants_blocks
from mmssl_jax.evaluation.model_encoder import ModelEncoder, grid_pool
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.models.registry import build_model


def numpy_grid_pool(grid: np.ndarray, cells: int) -> np.ndarray:
    """PyTorch's adaptive_avg_pool2d spans, looped: cell (i, j) before (i, j + 1)."""
    b, h, w, c = grid.shape
    span = lambda i, n: slice(math.floor(i * n / cells), math.ceil((i + 1) * n / cells))
    out = [
        grid[:, span(i, h), span(j, w)].mean(axis=(1, 2))
        for i in range(cells)
        for j in range(cells)
    ]
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize(
    "side, cells", [(6, 1), (6, 2), (6, 3), (6, 6), (14, 4), (7, 3), (1, 4), (2, 4)]
)
def test_grid_pool_equals_adaptive_average_pooling(side, cells):
    grid = np.random.default_rng(side).normal(size=(3, side, side, 5)).astype(np.float32)
    got = np.asarray(grid_pool(grid, cells))
    assert got.shape == (3, cells * cells * 5)
    np.testing.assert_allclose(got, numpy_grid_pool(grid, cells), atol=1e-5)


def test_grid_pool_of_a_divisible_map_is_the_mean_of_equal_blocks():
    grid = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    blocks = grid.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(np.asarray(grid_pool(grid, 4)), blocks, atol=1e-6)
    with pytest.raises(ValueError, match="grid0: the cell count must be at least 1"):
        grid_pool(grid, 0)


def test_grid_sizes_parse_the_layer_names():
    assert grid_sizes(["feature", "grid4", "emb", "grid2", "grid4", "blocks"]) == (2, 4)
    assert grid_sizes(["feature", "gridx", "my_grid4"]) == ()
    # Block features are computed only for an evaluation that reads them.
    assert not wants_blocks(["feature", "grid4", "emb"])
    assert wants_blocks(["feature", "blocks"]) and wants_blocks(["block_3"])
    # Raw pixels have no grid: their row reads their one feature.
    assert layer_sources(["grid4"], ["feature"]) == {"grid4": "feature"}


def tiny_model_encoder(grids) -> ModelEncoder:
    """An image-only tiny ViT on 8x8 images with 4x4 patches: a 2x2 map of 16 channels."""
    model = build_model(
        dict(
            image_encoder="vit_tiny",
            embed_dim=8,
            image_size=8,
            image_overrides=dict(width=16, depth=1, heads=2, patch_size=4),
        )
    )
    x = np.zeros((1, 8, 8, 3), np.float32)
    variables = model.init(jax.random.key(0), x, method=MultimodalModel.encode_image)
    return ModelEncoder(model, jax.device_get(variables), batch_size=4, grids=grids)


def test_model_encoder_adds_each_grid_layer():
    enc = tiny_model_encoder(grids=(1, 2))
    images = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    feats = enc.image_features(images)
    assert feats["grid1"].shape == (3, 16) and feats["grid2"].shape == (3, 64)
    # grid1 is the mean of the normed patch tokens: the "gap" feature of the same weights.
    gap = enc.model.clone(image_encoder=enc.model.image_encoder.clone(pool="gap"))
    x = augment.normalize(augment.to_float(images))
    out = gap.apply(enc.variables, x, method=MultimodalModel.encode_image)
    np.testing.assert_allclose(feats["grid1"], out["feature"], atol=1e-5)
    # The cells of grid2 average to grid1.
    np.testing.assert_allclose(feats["grid2"].reshape(3, 4, 16).mean(1), feats["grid1"], atol=1e-5)
    # A grid finer than the map repeats its cells: grid4 of a 2x2 map is each cell 2x2 times.
    grid4 = tiny_model_encoder(grids=(4,)).image_features(images)["grid4"].reshape(3, 4, 4, 16)
    np.testing.assert_allclose(grid4[:, ::2, ::2].reshape(3, 64), feats["grid2"], atol=1e-5)

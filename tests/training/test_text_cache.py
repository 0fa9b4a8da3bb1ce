"""The locked text tower's feature cache: its features equal the tower's (rows cut to their
length bucket, split over a mesh), each distinct row runs once, the table stays bounded, a
cached train step equals the step through the tower, and a tower that is not wholly frozen is
refused."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs.tiny_clip import get_config
from mmssl_jax.models.bert import BertEncoder
from mmssl_jax.models.text import TextTransformer
from mmssl_jax.parallel import mesh as parallel
from mmssl_jax.training.param_rules import lock_tower
from mmssl_jax.training.text_cache import LockedTextCache, length_buckets, row_lengths
from mmssl_jax.training.trainer import Trainer


def _tower():
    tower = TextTransformer(vocab_size=50, width=32, layers=1, heads=2, context_length=6)
    params = tower.init(jax.random.key(0), np.ones((2, 6), np.int32))["params"]
    return tower, params


def _tokens(rows):
    return np.asarray(rows, np.int32)


def test_features_equal_the_tower_and_each_distinct_row_runs_once():
    tower, params = _tower()
    rng = np.random.default_rng(0)
    distinct = rng.integers(1, 50, size=(5, 6))
    batch = distinct[[0, 1, 0, 2, 3, 4, 4, 1]]  # 8 rows, 5 distinct; chunk 4 pads 5 -> 8
    cache = LockedTextCache(tower, params, chunk=4)
    got = cache.features(_tokens(batch))
    want = np.asarray(tower.apply({"params": params}, _tokens(batch))["feature"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert cache.stats()["misses"] == 5 and cache.stats()["hits"] == 0 and len(cache) == 5
    again = cache.features(_tokens(batch[::-1]))
    np.testing.assert_allclose(again, want[::-1], rtol=1e-5, atol=1e-6)
    assert cache.stats()["hits"] == 8 and cache.stats()["misses"] == 5
    assert cache.stats()["hit_rate"] == pytest.approx(8 / 13)


def test_the_table_stays_within_max_entries_and_counts_what_it_could_not_keep():
    tower, params = _tower()
    rows = _tokens(np.random.default_rng(1).integers(1, 50, size=(5, 6)))
    cache = LockedTextCache(tower, params, chunk=2, max_entries=3)
    got = cache.features(rows)
    want = np.asarray(tower.apply({"params": params}, rows)["feature"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(cache) == 3 and cache.stats()["uncached"] == 2
    np.testing.assert_allclose(cache.features(rows), want, rtol=1e-5, atol=1e-6)
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 7  # 2 rows ran again


def test_length_buckets_and_row_lengths():
    assert length_buckets(16) == (4, 8, 12, 16)
    assert length_buckets(77) == (20, 39, 58, 77)
    assert length_buckets(3) == (1, 2, 3)
    rows = np.array([[5, 6, 0, 0], [0, 0, 0, 0], [5, 0, 7, 0], [1, 2, 3, 4]])
    assert row_lengths(rows, pad_id=0).tolist() == [2, 0, 3, 4]
    assert row_lengths(rows + 1, pad_id=1).tolist() == [2, 0, 3, 4]


@pytest.mark.parametrize("pool", ["eos", "argmax"])
def test_rows_cut_to_their_bucket_and_split_over_a_mesh_equal_the_tower(pool):
    """Right-padded rows of every length (0..12 tokens of 12) through a 4-device mesh in
    chunks of 6 rows: each row's feature is the uncut tower's."""
    tower = TextTransformer(
        vocab_size=50, width=32, layers=2, heads=2, context_length=12, pool=pool
    )
    params = tower.init(jax.random.key(0), np.ones((2, 12), np.int32))["params"]
    rng = np.random.default_rng(2)
    lengths = np.r_[np.arange(13), rng.integers(1, 13, size=11)]
    rows = rng.integers(1, 49, size=(len(lengths), 12))
    rows[np.arange(12)[None, :] >= lengths[:, None]] = 0
    rows[lengths > 0, lengths[lengths > 0] - 1] = 49  # argmax pooling reads the last token
    want = np.asarray(tower.apply({"params": params}, _tokens(rows))["feature"])
    mesh = parallel.make_mesh(4)
    cache = LockedTextCache(tower, params, chunk=6, mesh=mesh)
    assert cache.chunk == 8  # rounded up to a multiple of the 4 devices
    np.testing.assert_allclose(cache.features(_tokens(rows)), want, rtol=1e-5, atol=1e-6)
    assert cache.stats()["misses"] == len(np.unique(rows, axis=0))


def test_a_bert_tower_is_cut_at_its_own_pad_id():
    """Mean pooling over non-pad tokens, pad id 1 (read from the tower): cut rows equal the
    uncut tower's features."""
    tower = BertEncoder(
        vocab_size=40, hidden=16, layers=2, heads=4, intermediate=24, pad_id=1, context_length=16
    )
    params = tower.init(jax.random.key(1), np.full((2, 16), 2, np.int32))["params"]
    rng = np.random.default_rng(3)
    lengths = np.r_[np.arange(1, 17), rng.integers(1, 17, size=8)]
    rows = rng.integers(2, 40, size=(len(lengths), 16))
    rows[np.arange(16)[None, :] >= lengths[:, None]] = 1
    want = np.asarray(tower.apply({"params": params}, _tokens(rows))["feature"])
    cache = LockedTextCache(tower, params, chunk=4, mesh=parallel.make_mesh(2))
    assert cache.pad_id == 1
    np.testing.assert_allclose(cache.features(_tokens(rows)), want, rtol=1e-5, atol=1e-5)


def _config(data, lock=True):
    config = get_config(f"data={data}")
    config.model.image_overrides = {"depth": 1}
    config.model.text_overrides = {"layers": 1}
    config.train.update(batch_size=16, total_steps=6, log_every=3, ckpt_every=100, progress=False)
    config.train.cache_locked_text = True
    if lock:
        config.optim.freeze = tuple(lock_tower("text_encoder"))
    config.evals = {}
    return config


def test_a_cached_step_equals_the_step_through_the_tower(embedded_data, tmp_path):
    trainer = Trainer(_config(embedded_data), str(tmp_path / "run"))
    assert trainer.cache_text and trainer.cache_drops_tokens
    host = next(iter(trainer.data_iter))
    through_tower = parallel.to_global(host, trainer.mesh)
    state_a = trainer._init(trainer.config.seed)
    cache = LockedTextCache(trainer.model.text_encoder, state_a.params["text_encoder"])
    cached = parallel.to_global(cache.add_features(host), trainer.mesh)
    assert "tokens" not in cached and cached["text_feature"].shape == (16, 128)
    new_a, metrics_a = trainer.train_step(state_a, through_tower)
    new_b, metrics_b = trainer.train_step(trainer._init(trainer.config.seed), cached)
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-5)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(new_a.params),
        jax.tree.leaves(new_b.params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_a_run_with_the_cache_logs_its_hit_rate(embedded_data, tmp_path):
    workdir = tmp_path / "run"
    Trainer(_config(embedded_data), str(workdir)).run()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    assert 0.0 <= rows[0]["text_cache/hit_rate"] <= rows[1]["text_cache/hit_rate"] < 1.0
    assert rows[1]["text_cache/entries"] > 0
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_trainable_text_tower_is_refused(embedded_data, tmp_path):
    with pytest.raises(ValueError, match="cache_locked_text=True needs the whole text tower"):
        Trainer(_config(embedded_data, lock=False), str(tmp_path / "run"))

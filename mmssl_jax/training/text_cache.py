"""A locked text tower's features, computed once per distinct caption.

A text tower frozen whole (LiT's "U L", `optim.freeze` over all of `text_encoder`) is a fixed
function of the tokens, so its feature for a caption seen before is already known. Captions
repeat in most image-text data used for short runs: the embedded data draws ~33k distinct
texts (emoji names, keywords, templated captions, OpenClipArt titles, Fashion-MNIST prompts)
over and over. There the frozen MiniLM's forward cost more than the image tower's forward and
backward together. `LockedTextCache` keeps the features in host memory keyed by the token
row, runs the tower only on rows it has not seen (in fixed-size chunks: one compile), and the
trainer hands the step `text_feature` [B, width] in place of `tokens`; the step then runs
the trainable `text_projection` alone (objectives/outputs.py).

The misses of a batch are few (tens of rows once most captions were seen) and short (the
embedded data's captions average 9 of 16 tokens), so the tower runs them cut to the
shortest of four lengths (`length_buckets`) that holds each row's tokens, in chunks of a few
rows, split over the training mesh's devices: cutting trailing padding changes no feature
(padding is masked out of attention and pooling, positions are absolute), and it is the
compute the fixed [32, context] call spent on padding that this saves.

Turned on by `train.cache_locked_text` (the tiny recipes with a locked tower set it). It
pays where captions repeat; on web data with unique captions it only moves the tower's
forward out of the step, so it is off by default. Single-process runs only: the trainer
leaves it off (and logs why) when several processes train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmssl_jax.objectives.outputs import TEXT_FEATURE
from mmssl_jax.pytree import flat_items


def trainable_text_params(frozen: Any, params: Any) -> list[str]:
    """Paths under `params["text_encoder"]` that `frozen` (params -> tree of bools, or None)
    leaves trainable; empty when the whole tower is frozen."""
    tower = params.get("text_encoder") if isinstance(params, Mapping) else None
    if tower is None:
        raise ValueError("the model has no text_encoder parameters to cache features of")
    if frozen is None:
        return [f"text_encoder/{path}" for path, _ in flat_items(tower)]
    mask = frozen(params)["text_encoder"]
    return [f"text_encoder/{path}" for path, is_frozen in flat_items(mask) if not is_frozen]


def length_buckets(context_length: int, count: int = 4) -> tuple[int, ...]:
    """The token lengths the tower runs at: `count` even steps up to `context_length`
    (16 -> 4, 8, 12, 16), so a row is cut to at most a quarter of the context too long, at
    the price of one compile per length."""
    return tuple(sorted({-(-context_length * i // count) for i in range(1, count + 1)}))


def row_lengths(tokens: np.ndarray, pad_id: int) -> np.ndarray:
    """Per row, one past its last non-pad token (0 for an all-pad row)."""
    valid = tokens != pad_id
    return np.where(valid.any(axis=1), tokens.shape[1] - np.argmax(valid[:, ::-1], axis=1), 0)


class LockedTextCache:
    """Features of a frozen text tower, keyed by token row, computed on first sight.

    Args:
      text_encoder: the model's (unbound) text encoder module.
      params: its parameters (`state.params["text_encoder"]`); replicated over `mesh`'s
        devices, or copied to this process's first device without one.
      chunk: rows per tower call; rounded up to a multiple of the mesh's data axis. The
        misses of each length bucket are padded up to a multiple of it.
      max_entries: rows kept at most; past it, new rows are computed every time (counted as
        `uncached`).
      mesh: the training mesh; each tower call's rows are split over its data axis, so the
        misses use every device (None: one device).
      pad_id: the tokenizer's padding id (trailing columns of it are cut, see the module
        docstring); None reads the tower's `pad_id`, else 0.
      buckets: how many lengths rows are cut to (`length_buckets`); 1 runs every row at the
        full context length.
    """

    def __init__(
        self,
        text_encoder: Any,
        params: Any,
        chunk: int = 8,
        max_entries: int = 500_000,
        mesh: jax.sharding.Mesh | None = None,
        pad_id: int | None = None,
        buckets: int = 4,
    ):
        if mesh is None:  # params and rows on this process's first device
            params_at, rows_at, ways = jax.local_devices()[0], jax.local_devices()[0], 1
            in_shardings = None
        else:
            params_at, rows_at = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            ways, in_shardings = int(mesh.shape["data"]), (params_at, rows_at)
        self._params = jax.device_put(jax.device_get(params), params_at)
        self._rows_at = rows_at
        self._forward = jax.jit(
            lambda p, tokens: text_encoder.apply({"params": p}, tokens, train=False)["feature"],
            in_shardings=in_shardings,
        )
        self.chunk = -(-int(chunk) // ways) * ways
        self.max_entries = int(max_entries)
        self.pad_id = int(getattr(text_encoder, "pad_id", 0) if pad_id is None else pad_id)
        self.buckets = int(buckets)
        self.clear()

    def clear(self) -> None:
        """Forgets every feature and zeroes the counters (the compiled tower is kept)."""
        self._rows: dict[bytes, int] = {}  # token row -> index into self._table
        self._table = np.zeros((0, 0), np.float32)
        self.hits = self.misses = self.uncached = 0
        self.calls = self.tokens_run = 0  # tower calls, and the token positions they ran

    def __len__(self) -> int:
        return len(self._rows)

    def stats(self) -> dict[str, float]:
        """Counters since creation: hits, misses (rows the tower ran on), entries."""
        seen = self.hits + self.misses
        return {
            "hits": float(self.hits),
            "misses": float(self.misses),
            "uncached": float(self.uncached),
            "entries": float(len(self)),
            "hit_rate": self.hits / seen if seen else 0.0,
        }

    def _call(self, rows: np.ndarray) -> np.ndarray:
        """The tower on `rows` [N, l], N <= chunk: padded to `chunk` rows with repeats of real
        rows (no all-padding row is pooled), the padding's features dropped."""
        n = rows.shape[0]
        full = (
            np.concatenate([rows, rows[np.arange(self.chunk - n) % n]]) if n < self.chunk else rows
        )
        self.calls += 1
        self.tokens_run += full.size
        return np.asarray(self._forward(self._params, jax.device_put(full, self._rows_at)))[:n]

    def _run_tower(self, tokens: np.ndarray) -> np.ndarray:
        """Features of `tokens` [N, L]: each row cut to the shortest length bucket that holds
        it, run in chunks of `self.chunk` rows per bucket."""
        n, context = tokens.shape
        buckets = np.asarray(length_buckets(context, self.buckets))
        bucket_of = buckets[np.searchsorted(buckets, row_lengths(tokens, self.pad_id))]
        out: np.ndarray | None = None
        for length in np.unique(bucket_of):
            index = np.flatnonzero(bucket_of == length)
            for i in range(0, len(index), self.chunk):
                part = index[i : i + self.chunk]
                features = self._call(tokens[part, :length])
                if out is None:
                    out = np.zeros((n, features.shape[1]), np.float32)
                out[part] = features
        assert out is not None
        return out

    def _store(self, keys: list[bytes], features: np.ndarray) -> None:
        room = max(0, self.max_entries - len(self._rows))
        keys, features = keys[:room], features[:room]
        if not keys:
            return
        if self._table.shape[0] == 0:
            self._table = np.zeros((min(self.max_entries, 4096), features.shape[1]), np.float32)
        need = len(self._rows) + len(keys)
        if need > self._table.shape[0]:  # grow geometrically, never past max_entries
            grown = min(self.max_entries, max(need, 2 * self._table.shape[0]))
            self._table = np.concatenate(
                [
                    self._table,
                    np.zeros((grown - self._table.shape[0], self._table.shape[1]), np.float32),
                ]
            )
        start = len(self._rows)
        self._table[start : start + len(keys)] = features
        for i, key in enumerate(keys):
            self._rows[key] = start + i

    def features(self, tokens: np.ndarray) -> np.ndarray:
        """float32 [B, width] features of `tokens` [B, L], running the tower on unseen rows
        only (each distinct unseen row once, however often it repeats in the batch)."""
        tokens = np.ascontiguousarray(tokens)
        keys = [row.tobytes() for row in tokens]
        index = [self._rows.get(k, -1) for k in keys]
        new: dict[bytes, int] = {}  # unseen key -> first row holding it
        for row, (key, i) in enumerate(zip(keys, index, strict=True)):
            if i < 0 and key not in new:
                new[key] = row
        self.hits += sum(1 for i in index if i >= 0)
        self.misses += len(new)
        if not new:
            return self._table[np.asarray(index)]
        computed = self._run_tower(tokens[list(new.values())])
        before = len(self._rows)
        self._store(list(new), computed)
        self.uncached += len(new) - (len(self._rows) - before)
        by_key = dict(zip(new, computed, strict=True))
        return np.stack(
            [self._table[i] if i >= 0 else by_key[k] for k, i in zip(keys, index, strict=True)]
        )

    def add_features(
        self, batch: Mapping[str, np.ndarray], drop_tokens: bool = True
    ) -> dict[str, np.ndarray]:
        """`batch` with `text_feature` from its `tokens`; the tokens dropped unless an
        output other than `text_emb` reads them."""
        out = {k: v for k, v in batch.items() if not (drop_tokens and k == "tokens")}
        out[TEXT_FEATURE] = self.features(np.asarray(batch["tokens"]))
        return out

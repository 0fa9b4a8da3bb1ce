"""The grain input pipeline: TFRecord shards -> per-process batches of numpy arrays.

Training (`build_train_dataset`, `make_train_iterator`), per source:

    MapDataset.range(num_records)[process_index::process_count]    # shard by JAX process
      .shuffle(seed)  .repeat()                                     # global, new order per epoch
    MapDataset.mix(sources, weights)                                # deterministic interleave
      .map_with_index(...)                                          # stream position
      .random_map(_RecordProcessor)   # read + decode + caption/prompt + tokenize + crops
      .batch(global_batch // process_count, drop_remainder=True)
      .to_iter_dataset(ReadOptions)  .mp_prefetch(num_workers)      # when num_workers > 0

The shuffled elements are record numbers and the read of `TFRecordSource[i]` happens inside
the random map, so a record that fails (bad CRC, bad proto, bad image, ...) can be replaced
by another one. Each record's random numbers (caption choice, prompt template, crop boxes,
flips) come from grain's per-record generator, seeded by (seed, position in the stream): the
same seed gives the same batches for any `num_workers`, and an iterator restored from
`get_state()` (or `grain.checkpoint.CheckpointRestore` in orbax) continues exactly.

Batch keys (INTERFACES.md "Batches"); only those in `needs` are made, plus `index` and
`skipped`, which are always present:

    image   uint8 [B,S,S,3]  CLIP crop, scale data.clip_scale, no flip (as SLIP)
    view_a  uint8 [B,S,S,3]  SSL crop, scale data.ssl_scale, flipped with p=0.5 if data.flip
    view_b  uint8 [B,S,S,3]  second SSL crop of the same decoded image
    tokens  int32 [B,L]      one caption, chosen at random when a record has several; for an
                             image-label record without text, a random prompt template filled
                             with a (random synonym of the) class name, as UniCL does
    label   int32 [B]        class index (+ the source's label offset) for a `use_labels`
                             source, -1 for a caption pair
    id_hash int32 [B]        CRC32 of the record id (or "source/record"), non-negative
    topics  float32 [B,K]    the record's `topics` vector (shards from tools/fit_topics.py); a
                             record without one, or of another length than data.topic_dim
                             (when > 0), is a bad record
    rotated uint8 [B,S,S,3]  a crop (scale data.clip_scale, flipped with p=0.5 if data.flip)
                             for rotation prediction; it is rotated on the device (the k per
                             sample comes from the step key and the sample index, see
                             mmssl_jax/objectives/rotation.py), so no label crosses over
    index   int64 [B]        global position of the sample in the stream: unique over
                             processes and steps (seeds device augmentation)
    skipped int32 [B]        1 where a bad record was replaced (data.skip_bad_records)

Bad input. A record that cannot be used raises `BadInputError` naming the source, the shard
file and the byte offset of the record. With `data.skip_bad_records=True` it is instead
replaced by the next good record of the same process slice (record r -> r + process_count,
deterministic), `skipped` is 1 for that sample, and an absl warning names file, offset and
reason; nothing is dropped silently. Shard-level problems (a shard without its .idx, or a
stale .idx, e.g. after truncation) are found when the pipeline is built: an error naming the
shard, or with skip_bad_records a warning and an index rebuilt by scanning the shard
(CRC-checked); records the old index promised beyond the readable end are kept as entries
that fail when drawn, so they are counted as skips like any other bad record.

Evaluation (`iter_eval_batches`, `build_eval_arrays`): every record in order, resized and
centre-cropped deterministically, bad records are always errors.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from input_pipeline import records, tfrecord, transforms
from input_pipeline import templates as templates_lib
from input_pipeline.tokenizers.spm import Tokenizer

# Keys a training batch can hold; "index" and "skipped" are always produced.
BATCH_KEYS = frozenset(
    {"image", "view_a", "view_b", "tokens", "label", "id_hash", "topics", "rotated"}
)
ALWAYS_KEYS = frozenset({"index", "skipped"})
# A run of this many bad records in a row (one replacement chain) means a broken shard set.
MAX_REPLACEMENTS = 64
# Errors that make one record unusable (the source read, the proto, the image, the caption).
BAD_RECORD_ERRORS = (tfrecord.RecordError, records.BadRecordError, transforms.BadImageError)


class BadInputError(ValueError):
    """A training/eval record that cannot be used; names source, shard file and offset."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"bad record {where}: {reason}")
        self.where, self.reason = where, reason

    def __reduce__(self):  # rebuilt from (where, reason) when sent back by a grain worker
        return type(self), (self.where, self.reason)


# ----------------------------------------------------------------------------------------
# Config schema


def source_config(
    shards: str,
    *,
    weight: float = 1.0,
    classnames: str = "",
    use_labels: bool = False,
    prompt_templates: str = "imagenet80",
    captions: int = 0,
) -> ml_collections.ConfigDict:
    """One entry of `data.sources`.

    shards:            glob (or comma-separated globs) of TFRecord shards with .idx sidecars.
    weight:            mixing weight (relative; sources are interleaved in these proportions).
                       An epoch of a mixture ends when the source with the fewest records
                       per unit of weight has been read once (grain's finite mix length;
                       `train.epochs` counts these, training/trainer.epoch_records).
    classnames:        path to a JSON list of class names (an entry may be a list of
                       synonyms), or "". Its length is the number of classes: a label outside
                       [-1, len) is a bad record. Needed by `use_labels` sources.
    use_labels:        True: labels are UniCL targets and records without text get prompts.
                       False: caption data, `label` is -1 in the batch.
    prompt_templates:  template set for prompts (input_pipeline/templates: imagenet80,
                       imagenet7, simple) or a path to a JSON list of templates.
    captions:          draw each step's caption among the first `captions` texts of a record
                       (0: all of them); e.g. the embedded emoji's first three texts are its
                       name and the name in two templates, the rest its single keywords.
    """
    return ml_collections.ConfigDict(
        {
            "shards": shards,
            "weight": float(weight),
            "classnames": classnames,
            "use_labels": bool(use_labels),
            "prompt_templates": prompt_templates,
            "captions": int(captions),
        }
    )


def default_config() -> ml_collections.ConfigDict:
    """`config.data` with its defaults; recipes add `data.sources.<name> = source_config(...)`.

    sources:           name -> source_config(...); at least one with weight > 0.
    tokenizer:         path to the sentencepiece .model (needed when "tokens" is needed).
    image_size:        output side S of every crop.
    text_length:       L, tokens per caption (EOS included).
    clip_scale:        area range of the CLIP crop (SLIP: 0.5-1, no flip).
    ssl_scale:         area range of the two SSL crops (SimCLR: 0.08-1).
    flip:              flip SSL views left-right with p=0.5.
    seed:              data seed: shuffles, caption/prompt choice, crops.
    shuffle:           global shuffle per source, reshuffled every epoch (False: file order).
    num_workers:       grain worker processes (0: decode in this process with threads).
    num_threads:       decode threads per process/worker (batches made concurrently).
    prefetch_batches:  batches buffered per process/worker.
    skip_bad_records:  replace and count bad records instead of raising.
    topic_dim:         length K of every record's `topics` (0: not checked).
    """
    return ml_collections.ConfigDict(
        {
            "sources": ml_collections.ConfigDict(),
            "tokenizer": "",
            "image_size": 224,
            "text_length": 77,
            "clip_scale": (0.5, 1.0),
            "ssl_scale": (0.08, 1.0),
            "flip": True,
            "seed": 0,
            "shuffle": True,
            "num_workers": 0,
            "num_threads": 4,
            "prefetch_batches": 2,
            "skip_bad_records": False,
            "topic_dim": 0,
        }
    )


# ----------------------------------------------------------------------------------------
# Sources


def load_classnames(path_or_list: str | Sequence | None) -> list | None:
    """Class names from a JSON file (a list; an entry may be a list of synonyms), or None."""
    if path_or_list is None or path_or_list == "":
        return None
    if isinstance(path_or_list, str):
        with open(path_or_list) as f:
            names = json.load(f)
        where = path_or_list
    else:
        names, where = list(path_or_list), "classnames"
    ok = isinstance(names, list) and names
    for n in names if ok else ():
        if not (isinstance(n, str) and n) and not (
            isinstance(n, list) and n and all(isinstance(s, str) and s for s in n)
        ):
            ok = False
    if not ok:
        raise ValueError(
            f"{where}: expected a non-empty JSON list of class names (strings, or non-empty "
            "lists of synonyms)"
        )
    return names


class _ReindexedSource(tfrecord.TFRecordSource):
    """A TFRecordSource over offsets computed here rather than read from .idx files.

    Used only with skip_bad_records, for shards whose index is missing or stale. It fills the
    same fields TFRecordSource.__init__ fills, so reads (CRC-checked), `locate` and pickling
    behave the same.
    """

    def __init__(self, paths: Sequence[str], offsets: Sequence[np.ndarray]):
        self.paths = list(paths)
        self.verify_crc = True
        self._offsets = [np.asarray(o, np.int64) for o in offsets]
        self._sizes = [os.path.getsize(p) for p in self.paths]
        counts = np.array([len(o) for o in self._offsets], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        if self._starts[-1] == 0:
            raise ValueError(f"shard set {self.paths} holds zero readable records")
        self._fds = {}
        self._lock = threading.Lock()


def _rebuild_offsets(path: str, indexed: np.ndarray | None) -> np.ndarray:
    """Offsets of a shard found by scanning it (CRC-checked) up to its first bad frame.

    The bad frame, and the entries of the old index beyond it, are kept: reading them fails
    again later, so each is replaced and counted rather than lost without a trace.
    """
    good, end = [], 0
    try:
        for offset, framed, _ in tfrecord.iter_frames(path):
            good.append(offset)
            end = offset + framed
    except tfrecord.RecordError as e:
        logging.warning("data: %s: scan stopped at byte %d: %s", path, e.offset, e.reason)
        good.append(e.offset)
        end = e.offset + 1
    extra = [int(o) for o in indexed if o >= end] if indexed is not None else []
    return np.asarray(good + extra, np.int64)


def open_records(shards: str, *, lenient: bool = False) -> tfrecord.TFRecordSource:
    """The random-access source for a shard glob.

    A shard with a missing or stale .idx is an error naming it; with `lenient` it is
    re-indexed by a scan instead (see module docstring) and a warning is logged.
    """
    if not lenient:
        return tfrecord.TFRecordSource(shards)
    paths = tfrecord.expand_paths(shards)
    offsets, rebuilt = [], False
    for path in paths:
        try:
            offsets.append(tfrecord.read_index(path))
            continue
        except tfrecord.StaleIndexError as e:
            reason = e.reason
            try:
                stale = np.loadtxt(tfrecord.index_path(path), dtype=np.int64, ndmin=2)[:, 0]
            except ValueError:  # unreadable index text: rely on the scan alone
                stale = None
        except FileNotFoundError as e:
            reason, stale = str(e), None
        logging.warning("data: %s; skip_bad_records: rebuilding its index by a scan", reason)
        offsets.append(_rebuild_offsets(path, stale))
        rebuilt = True
    if not rebuilt:
        return tfrecord.TFRecordSource(paths)
    return _ReindexedSource(paths, offsets)


@dataclasses.dataclass(frozen=True)
class _Source:
    """Everything a worker needs to turn record r of one source into a sample."""

    name: str
    records: tfrecord.TFRecordSource
    use_labels: bool
    classnames: tuple | None
    templates: tuple[str, ...]
    label_offset: int
    captions: int = 0  # how many of a record's first texts are drawn from (0: all)

    @property
    def num_classes(self) -> int | None:
        return None if self.classnames is None else len(self.classnames)

    def where(self, r: int) -> str:
        path, offset = self.records.locate(r)
        return f"{path} @ byte {offset} (record {r} of source {self.name!r})"


def _make_sources(data_cfg: ml_collections.ConfigDict) -> tuple[list[_Source], list[float]]:
    """Opens every source with weight > 0 (name order) and assigns label offsets.

    Sources naming the same classnames file share a label space; different label spaces get
    disjoint label ranges (offset by the classes before them) so UniCL never merges classes
    of unrelated datasets.
    """
    if not data_cfg.sources:
        raise ValueError("config.data.sources is empty: add data.sources.<name> = source_config()")
    sources, weights, offsets = [], [], {}
    next_offset = 0
    for name in sorted(data_cfg.sources):
        cfg = data_cfg.sources[name]
        weight = float(cfg.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"data.sources.{name}.weight must be >= 0, got {weight}")
        if weight == 0:
            logging.info("data: source %r has weight 0 and is not read", name)
            continue
        # Shards first: a source that was never built fails on its glob, with the fix.
        try:
            recs = open_records(cfg.shards, lenient=data_cfg.skip_bad_records)
        except (FileNotFoundError, tfrecord.RecordError) as e:
            e.add_note(
                f"while opening data source {name!r} (shards {cfg.shards!r}); to train "
                f"without it, set --config.data.sources.{name}.weight=0"
            )
            raise
        use_labels = bool(cfg.get("use_labels", False))
        classnames_path = cfg.get("classnames", "") or ""
        try:
            classnames = load_classnames(classnames_path)
        except (OSError, ValueError) as e:
            e.add_note(f"while reading data.sources.{name}.classnames ({classnames_path!r})")
            raise
        if use_labels and classnames is None:
            raise ValueError(f"data.sources.{name}: use_labels=True needs a classnames file")
        label_offset = 0
        if use_labels:
            key = os.path.abspath(classnames_path)
            if key not in offsets:
                offsets[key] = next_offset
                next_offset += len(classnames)
            label_offset = offsets[key]
        templates = templates_lib.load_templates(cfg.get("prompt_templates", "imagenet80"))
        captions = int(cfg.get("captions", 0))
        if captions < 0:
            raise ValueError(f"data.sources.{name}.captions must be >= 0 (0: all), got {captions}")
        sources.append(
            _Source(
                name=name,
                records=recs,
                use_labels=use_labels,
                classnames=None if classnames is None else tuple(classnames),
                templates=tuple(templates),
                label_offset=label_offset,
                captions=captions,
            )
        )
        weights.append(weight)
    if not sources:
        raise ValueError("every data source has weight 0")
    return sources, weights


# ----------------------------------------------------------------------------------------
# Per-record processing


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))] if len(items) > 1 else items[0]


def choose_text(example: Mapping[str, Any], source: _Source, rng: np.random.Generator) -> str:
    """One caption (uniformly among a record's first `source.captions` texts, 0: all) or, for
    an image-label record of a `use_labels` source without text, a random template over a
    random synonym of its class.

    Raises BadRecordError for an empty caption or a record with neither text nor label.
    """
    texts = [t.strip() for t in example["texts"]]
    if texts:
        if not all(texts):
            raise records.BadRecordError("", f"empty caption in {example['texts']!r}")
        return _choice(rng, records.first_texts(texts, source.captions))
    label = example["label"]
    if not source.use_labels:
        raise records.BadRecordError("", "caption source record has no text")
    if label < 0:
        raise records.BadRecordError("", "image-label record has neither text nor label")
    name = source.classnames[label]
    if not isinstance(name, str):
        name = _choice(rng, name)
    return _choice(rng, source.templates).format(name)


def _id_hash(sample_id: str, source: _Source, r: int) -> np.int32:
    key = sample_id or f"{source.name}/{r}"
    return np.int32(zlib.crc32(key.encode("utf-8")) & 0x7FFFFFFF)


class _RecordProcessor:
    """grain random map: (position, source id, record) -> one sample dict of numpy arrays."""

    def __init__(
        self,
        sources: Sequence[_Source],
        *,
        needs: frozenset[str],
        tokenizer: Tokenizer | None,
        text_length: int,
        crop_specs: Sequence[tuple[str, transforms.CropSpec]],
        skip_bad_records: bool,
        step: int,
        local_batch: int,
        global_batch: int,
        process_index: int,
        topic_dim: int = 0,
    ):
        self.sources = list(sources)
        self.topic_dim = topic_dim
        self.needs = needs
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.crop_specs = list(crop_specs)
        self.skip_bad_records = skip_bad_records
        self.step = step
        self.local_batch = local_batch
        self.global_batch = global_batch
        self.process_index = process_index

    def global_index(self, position: int) -> int:
        """Position in the global stream: global batches are process slices in order."""
        step, row = divmod(position, self.local_batch)
        return step * self.global_batch + self.process_index * self.local_batch + row

    def __call__(self, element: tuple[int, tuple[int, int]], rng: np.random.Generator) -> dict:
        position, (source_id, r) = element
        source = self.sources[source_id]
        n = len(source.records)
        replaced = 0
        while True:
            try:
                sample = self._sample(source, r, rng)
                break
            except BAD_RECORD_ERRORS as e:
                where, reason = source.where(r), getattr(e, "reason", str(e))
                if not self.skip_bad_records:
                    raise BadInputError(where, reason) from e
                if replaced >= MAX_REPLACEMENTS:
                    raise BadInputError(
                        where, f"{reason}; and {replaced} bad records before it in a row"
                    ) from e
                replaced += 1
                r = (r + self.step) % n
                logging.warning(
                    "data: skipping bad record %s: %s; replaced by record %d", where, reason, r
                )
        sample["index"] = np.int64(self.global_index(position))
        sample["skipped"] = np.int32(replaced > 0)
        return sample

    def _sample(self, source: _Source, r: int, rng: np.random.Generator) -> dict:
        example = records.decode_example(source.records[r], num_classes=source.num_classes)
        # The text is chosen (and checked) even when no term needs tokens, so which records
        # count as bad, and the random draws that follow, do not depend on the objective.
        text = choose_text(example, source, rng)
        out = {}
        if "tokens" in self.needs:
            out["tokens"] = self.tokenizer.encode([text], self.text_length)[0]
        if "label" in self.needs:
            label = example["label"]
            use = source.use_labels and label >= 0
            out["label"] = np.int32(label + source.label_offset if use else -1)
        if "id_hash" in self.needs:
            out["id_hash"] = _id_hash(example["id"], source, r)
        if "topics" in self.needs:
            out["topics"] = self._topics(example)
        if self.crop_specs:
            views = transforms.multi_crop(
                example["image"], rng, [spec for _, spec in self.crop_specs]
            )
            for (key, _), view in zip(self.crop_specs, views, strict=True):
                out[key] = view
        return out

    def _topics(self, example: Mapping[str, Any]) -> np.ndarray:
        topics = example["topics"]
        if topics is None or topics.size == 0:
            raise records.BadRecordError(
                "", "record has no 'topics' feature (make shards with tools/fit_topics.py)"
            )
        if self.topic_dim > 0 and topics.size != self.topic_dim:
            raise records.BadRecordError(
                "", f"topics has {topics.size} values, data.topic_dim is {self.topic_dim}"
            )
        return np.asarray(topics, np.float32)


# ----------------------------------------------------------------------------------------
# Training dataset


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (grain seeds must fit in uint32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # deferred: worker processes that unpickle this module need no JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _crop_specs(data_cfg, needs: frozenset[str]) -> list[tuple[str, transforms.CropSpec]]:
    size = int(data_cfg.image_size)
    specs = []
    if "image" in needs:
        specs.append(("image", transforms.CropSpec(size, tuple(data_cfg.clip_scale))))
    for key in ("view_a", "view_b"):
        if key in needs:
            spec = transforms.CropSpec(size, tuple(data_cfg.ssl_scale), flip=bool(data_cfg.flip))
            specs.append((key, spec))
    if "rotated" in needs:
        spec = transforms.CropSpec(size, tuple(data_cfg.clip_scale), flip=bool(data_cfg.flip))
        specs.append(("rotated", spec))
    return specs


def build_train_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    needs: set[str] | frozenset[str],
    tokenizer: Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The infinite training dataset of this process's batches (see module docstring).

    `needs`: batch keys the objective terms use (subset of BATCH_KEYS; "index"/"skipped"
    are always added). Process index/count default to JAX's. Each process yields
    global_batch_size // process_count samples per batch. `tokenizer`: the run's, when the
    caller has it open (else `data_cfg.tokenizer` is opened).
    """
    needs = frozenset(needs) - ALWAYS_KEYS
    unknown = needs - BATCH_KEYS
    if unknown:
        raise ValueError(f"unknown batch keys {sorted(unknown)}; known: {sorted(BATCH_KEYS)}")
    pi, pc = _process_slice(process_index, process_count)
    if global_batch_size % pc:
        raise ValueError(f"global batch {global_batch_size} not divisible by {pc} processes")
    local_batch = global_batch_size // pc
    if "tokens" not in needs:
        tokenizer = None
    elif tokenizer is None:
        if not data_cfg.tokenizer:
            raise ValueError("batch needs 'tokens' but config.data.tokenizer is not set")
        tokenizer = Tokenizer(data_cfg.tokenizer)

    sources, weights = _make_sources(data_cfg)
    parts = []
    for i, source in enumerate(sources):
        n = len(source.records)
        if n < pc:
            raise ValueError(f"source {source.name!r} has {n} records for {pc} processes")
        ds = grain.MapDataset.range(n)[pi::pc]
        if data_cfg.shuffle:
            ds = ds.seed(_seed(data_cfg.seed, i)).shuffle()
        ds = ds.repeat().map(lambda r, i=i: (i, r))
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
    processor = _RecordProcessor(
        sources,
        needs=needs,
        tokenizer=tokenizer,
        text_length=int(data_cfg.text_length),
        crop_specs=_crop_specs(data_cfg, needs),
        skip_bad_records=bool(data_cfg.skip_bad_records),
        step=pc,
        local_batch=local_batch,
        global_batch=global_batch_size,
        process_index=pi,
        topic_dim=int(data_cfg.get("topic_dim", 0) or 0),
    )
    # Per-process augmentation seed: processes must not draw the same crops at a position.
    ds = ds.map_with_index(lambda position, x: (position, x))
    ds = ds.random_map(processor, seed=_seed(data_cfg.seed, 1_000_003, pi))
    ds = ds.batch(local_batch, drop_remainder=True)
    threads = max(1, int(data_cfg.get("num_threads", 4)))
    read = grain.ReadOptions(
        num_threads=threads,
        prefetch_buffer_size=max(threads, int(data_cfg.get("prefetch_batches", 2))),
    )
    it_ds = ds.to_iter_dataset(read)
    workers = int(data_cfg.get("num_workers", 0))
    if workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
            # nothing parsed them, so take their defaults.
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it_ds


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    needs: set[str] | frozenset[str],
    tokenizer: Tokenizer | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """An iterator over `build_train_dataset(...)`: `next()` gives a batch dict;
    `get_state()`/`set_state()` (or grain.checkpoint.CheckpointSave/Restore inside an orbax
    Composite) resume at the exact next batch. Call `.close()` when done with workers."""
    ds = build_train_dataset(
        data_cfg,
        global_batch_size=global_batch_size,
        needs=needs,
        tokenizer=tokenizer,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(ds)


# ----------------------------------------------------------------------------------------
# Evaluation


def _eval_record(
    recs: tfrecord.TFRecordSource,
    r: int,
    *,
    image_size: int,
    resize_size: int | None,
    num_classes: int | None,
) -> tuple[np.ndarray, dict]:
    path, offset = recs.locate(r)
    where = f"{path} @ byte {offset} (record {r})"
    try:
        example = records.decode_example(recs[r], where=where, num_classes=num_classes)
        image = transforms.resize_center_crop(
            example["image"], image_size, resize_size, where=where
        )
        texts = [t.strip() for t in example["texts"]]
        if not all(texts):
            raise records.BadRecordError(where, f"empty caption in {example['texts']!r}")
    except BAD_RECORD_ERRORS as e:
        raise BadInputError(where, getattr(e, "reason", str(e))) from e
    return image, {"label": example["label"], "texts": texts, "id": example["id"]}


def iter_eval_batches(
    shards: str | Sequence[str],
    *,
    image_size: int,
    resize_size: int | None = None,
    tokenizer: Tokenizer | None = None,
    text_length: int = 77,
    classnames: str | Sequence | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    num_threads: int = 8,
) -> Iterator[dict]:
    """Every record of `shards` (a glob, comma-separated globs or a list of paths) in file
    order (the first `limit`), in batches of `batch_size` (the last may be smaller), decoded
    with `resize_center_crop`.

    Each batch: image uint8 [b,S,S,3], label int32 [b], id (list[str]), texts
    (list[list[str]], all captions); with a tokenizer also tokens int32 [b,L] of each
    record's first caption (a record without text gets an all-zero row). `classnames` (a
    JSON path or list) bounds the labels. Any bad record raises BadInputError naming it.
    """
    recs = tfrecord.TFRecordSource(shards)
    names = load_classnames(classnames)
    num_classes = None if names is None else len(names)
    n = len(recs) if limit is None else min(int(limit), len(recs))

    def load(r: int):
        return _eval_record(
            recs, r, image_size=image_size, resize_size=resize_size, num_classes=num_classes
        )

    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start in range(0, n, batch_size):
            rows = list(pool.map(load, range(start, min(n, start + batch_size))))
            batch = {
                "image": np.stack([img for img, _ in rows]),
                "label": np.array([m["label"] for _, m in rows], np.int32),
                "id": [m["id"] for _, m in rows],
                "texts": [m["texts"] for _, m in rows],
            }
            if tokenizer is not None:
                tokens = np.zeros((len(rows), text_length), np.int32)
                with_text = [i for i, (_, m) in enumerate(rows) if m["texts"]]
                if with_text:
                    first = [rows[i][1]["texts"][0] for i in with_text]
                    tokens[with_text] = tokenizer.encode(first, text_length)
                batch["tokens"] = tokens
            yield batch


def build_eval_arrays(
    shards: str | Sequence[str],
    *,
    image_size: int,
    resize_size: int | None = None,
    tokenizer: Tokenizer | None = None,
    text_length: int = 77,
    classnames: str | Sequence | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    num_threads: int = 8,
) -> dict:
    """The whole eval set in memory (records in file order), for zero-shot, probes, kNN and
    retrieval. Same arguments as `iter_eval_batches`. Returns:

        image uint8 [N,S,S,3], label int32 [N], id list[str], texts list[list[str]]
        with a tokenizer: tokens int32 [N,L] (first caption per record), and for retrieval
        caption_tokens int32 [M,L] (every caption) with caption_image int32 [M] (its record).
    """
    batches = list(
        iter_eval_batches(
            shards,
            image_size=image_size,
            resize_size=resize_size,
            tokenizer=tokenizer,
            text_length=text_length,
            classnames=classnames,
            limit=limit,
            batch_size=batch_size,
            num_threads=num_threads,
        )
    )
    if not batches:
        raise ValueError(f"no records to evaluate in {shards!r} (limit={limit})")
    out = {
        "image": np.concatenate([b["image"] for b in batches]),
        "label": np.concatenate([b["label"] for b in batches]),
        "id": [i for b in batches for i in b["id"]],
        "texts": [t for b in batches for t in b["texts"]],
    }
    if tokenizer is not None:
        out["tokens"] = np.concatenate([b["tokens"] for b in batches])
        captions = [(i, c) for i, texts in enumerate(out["texts"]) for c in texts]
        out["caption_image"] = np.array([i for i, _ in captions], np.int32)
        out["caption_tokens"] = (
            tokenizer.encode([c for _, c in captions], text_length)
            if captions
            else np.zeros((0, text_length), np.int32)
        )
    return out

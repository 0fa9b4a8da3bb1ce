"""Cross-modal retrieval: Recall@K and mAP, image->text and text->image.

Two notions of a relevant result:
- pair: the caption(s) of the query image, or the image of the query caption (COCO/Flickr
  style, as big_vision's image_text_retrieval reports it);
- class: any result of the query's class (the thesis's cross-modal protocol, where mAP over
  the whole ranking is the headline number).

Results are ranked by cosine similarity; equal scores keep index order (a stable sort), so
exact ties count as in the order the items came. AP of one query = mean over its relevant
results of the precision at their rank; it equals scikit-learn's average_precision_score when
there are no ties. Queries with no relevant result are left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from input_pipeline.records import first_texts
from mmssl_jax.evaluation import context
from mmssl_jax.evaluation.encoder import l2_normalize


def ranking_metrics(
    sims: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per-query hits@K (bool [Q] per k) and AP ([Q], NaN when nothing is relevant).

    `sims` [Q, M] scores, `relevant` bool [Q, M].
    """
    order = np.argsort(-sims, axis=1, kind="stable")
    rel = np.take_along_axis(relevant, order, axis=1)
    hits = {k: rel[:, :k].any(axis=1) for k in ks}
    cum = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    num_rel = rel.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(rel, cum / ranks, 0.0).sum(axis=1) / num_rel
    return hits, np.where(num_rel > 0, ap, np.nan)


def _direction(
    queries: np.ndarray,
    items: np.ndarray,
    relevant_fn,
    ks: Sequence[int],
    chunk: int,
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    hits: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    aps = []
    for start in range(0, len(queries), chunk):
        rows = np.arange(start, min(start + chunk, len(queries)))
        h, ap = ranking_metrics(queries[rows] @ items.T, relevant_fn(rows), ks)
        for k in ks:
            hits[k].append(h[k])
        aps.append(ap)
    return {k: np.concatenate(v) for k, v in hits.items()}, np.concatenate(aps)


def _same_class(query_y: np.ndarray, item_y: np.ndarray) -> np.ndarray:
    """bool [Q, M]; label -1 (no class) is relevant to nothing."""
    return (query_y[:, None] == item_y[None, :]) & (query_y[:, None] >= 0)


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    *,
    image_labels: np.ndarray | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 256,
) -> dict[str, float]:
    """Retrieval metrics between N images and M captions.

    `text_to_image` int [M]: the image each caption belongs to (an image may have several).
    Returns img2txt_R@K and txt2img_R@K (pair relevance); with `image_labels` [N] also
    img2txt_class_R@K, txt2img_class_R@K, img2txt_mAP and txt2img_mAP (class relevance;
    a caption's class is its image's; label -1 means none). A query with nothing relevant
    (an image without captions, an unlabelled one) is left out of that metric's mean.
    """
    img = l2_normalize(image_emb)
    txt = l2_normalize(text_emb)
    t2i = np.asarray(text_to_image)
    img_ids = np.arange(len(img))
    out: dict[str, float] = {}

    directions = {
        "": (
            lambda r: img_ids[r][:, None] == t2i[None, :],
            lambda r: t2i[r][:, None] == img_ids[None, :],
        )
    }
    if image_labels is not None:
        img_y = np.asarray(image_labels)
        txt_y = img_y[t2i]
        directions["class_"] = (
            lambda r: _same_class(img_y[r], txt_y),
            lambda r: _same_class(txt_y[r], img_y),
        )
    for kind, (i2t_rel, t2i_rel) in directions.items():
        for name, queries, items, rel in (
            ("img2txt", img, txt, i2t_rel),
            ("txt2img", txt, img, t2i_rel),
        ):
            hits, ap = _direction(queries, items, rel, ks, chunk)
            valid = ~np.isnan(ap)  # queries with at least one relevant result
            for k in ks:
                out[f"{name}_{kind}R@{k}"] = float(np.mean(hits[k][valid]))
            if kind:
                out[f"{name}_mAP"] = float(np.mean(ap[valid]))
    return out


def flatten_captions(
    captions: Sequence[str | Sequence[str]], per_image: int = 0
) -> tuple[list[str], np.ndarray]:
    """Per-image caption lists -> (flat texts, text_to_image), keeping the first `per_image`
    captions of each image (0: all). Images with none are skipped."""
    texts, owner = [], []
    for i, caps in enumerate(captions):
        caps = first_texts([caps] if isinstance(caps, str) else list(caps), per_image)
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return texts, np.asarray(owner, np.int64)


# ---- the evaluator entry (type "retrieval", found by name: see runner.py) ----

# captions: how many of each record's texts are its captions, first ones first (0: all). The
# embedded emoji keep 1, the CLDR name: their other texts (single keywords such as "face")
# are training text, not captions that name one image.
DEFAULTS = dict(shards=None, ks=(1, 5, 10), class_relevance=True, captions=0)
SPLITS = ("shards",)  # the shard keys it reads
NEEDS_TEXT = True  # skipped (with a warning) for an encoder without a text tower
RAW_PIXELS = True  # whether the raw-pixel baseline applies
TSNE = False  # t-SNE map by default
PER_LAYER = False  # metrics are "<layer>/<metric>" rows
CONCURRENT = True  # device work only through call.features / call.texts


def run(call, name, cfg, encoder, rows, artifacts) -> dict[str, float]:
    """Runs the evaluation `name` (config `cfg`) on `encoder`; see the module docstring."""
    arrays = context.load_arrays(name, cfg, "shards")
    texts, text_to_image = flatten_captions(arrays["texts"], int(cfg["captions"]))
    if not texts:
        raise context.CannotEvaluateError(
            f"evals.{name}: the records of {cfg['shards']!r} carry no captions"
        )
    feats = call.features(encoder, arrays, cfg, f"{name} images")
    if "emb" not in feats:
        raise ValueError(f"evals.{name}: retrieval needs the encoder's 'emb' output")
    text_emb = call.texts(encoder, texts, cfg, ("captions", id(arrays)))
    labels = np.asarray(arrays["label"])
    use_classes = cfg["class_relevance"] and bool((labels >= 0).any())
    return retrieval_metrics(
        feats["emb"],
        text_emb,
        text_to_image,
        image_labels=labels if use_classes else None,
        ks=tuple(cfg["ks"]),
    )

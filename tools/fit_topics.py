"""Fits a text model on the captions of a shard set and writes shards with `topics` targets.

    python tools/fit_topics.py --fit 'data/emoji/emoji-train-*.tfrecord' \\
        --apply 'data/emoji/emoji-test-*.tfrecord' --kind lda --dim 40 --seed 0 \\
        --output_dir data/topics_lda/emoji

Every shard of --fit and --apply is copied to --output_dir (same file names, same records in
the same order, plus .idx) with each record's `topics` feature set to the vector of its
captions; the JSON sidecars of the input folders (class names, stats) are copied along. The
fitted model goes to --output_dir/text_model.{json,npz} (no pickle; see
input_pipeline/sources/topics.py). Kinds: lda (topic distributions, sum to 1), lsa (TF-IDF +
truncated SVD, L2-normalised), word2vec (mean skip-gram word vector; needs gensim), bert
(the sentence embedding of the record's document by a pretrained BERT-family encoder on disk,
--bert all-minilm-l6-v2 by default: nothing is fitted, the vectors are the encoder's; --dim
is its hidden size).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.sources import topics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fit", action="append", required=True, help="shard glob(s) to fit on")
    p.add_argument("--apply", action="append", default=[], help="more shard glob(s) to label")
    p.add_argument("--output_dir", required=True, help="where shards and the model go")
    p.add_argument("--kind", choices=(*topics.KINDS, "bert"), default="lda", help="text model")
    p.add_argument("--bert", default="all-minilm-l6-v2", help="BERT directory or name (bert)")
    p.add_argument("--bert_length", type=int, default=64, help="WordPiece tokens kept (bert)")
    p.add_argument("--dim", type=int, default=40, help="topics (LDA) or dimensions")
    p.add_argument("--seed", type=int, default=0, help="random seed of the fit")
    p.add_argument("--min_df", type=int, default=2, help="drop words in fewer documents")
    p.add_argument("--max_df", type=float, default=0.5, help="drop words in more of them")
    p.add_argument("--max_iter", type=int, default=50, help="LDA passes / Word2Vec epochs")
    p.add_argument(
        "--classnames",
        default="",
        help="JSON list of class names: the text of records without captions",
    )
    return p.parse_args(argv)


def _copy_sidecars(paths: list[str], output_dir: str) -> None:
    for folder in sorted({os.path.dirname(p) for p in paths}):
        for side in sorted(glob.glob(os.path.join(folder, "*.json"))):
            target = os.path.join(output_dir, os.path.basename(side))
            if os.path.abspath(side) != os.path.abspath(target):
                shutil.copyfile(side, target)


def bert_text_model(name_or_path: str, length: int):
    """(a TextModel record of the encoder, docs -> [n, hidden] vectors) for kind "bert"."""
    from mmssl_jax.models import bert

    directory = bert.find_bert_dir(name_or_path)
    hidden = bert.read_bert_config(directory)["hidden"]
    options = {"dim": hidden, "model": str(name_or_path), "length": length}
    model = topics.TextModel("bert", options, [], {})

    def vectors_for(docs: list[str]):
        return bert.embed_sentences(docs, directory, length=length)

    return model, vectors_for


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    classnames = None
    if args.classnames:
        with open(args.classnames, encoding="utf-8") as f:
            classnames = json.load(f)
    fit_paths = topics.expand(args.fit)
    docs = [topics.record_text(ex, classnames) for _, ex in topics.iter_examples(fit_paths)]
    empty = sum(not d for d in docs)
    if args.kind == "bert":
        model, vectors_for = bert_text_model(args.bert, args.bert_length)
    else:
        model = topics.fit_text_model(
            docs,
            args.kind,
            dim=args.dim,
            seed=args.seed,
            min_df=args.min_df,
            max_df=args.max_df,
            max_iter=args.max_iter,
        )
        vectors_for = model.transform
    model.save(args.output_dir)
    paths = topics.expand(args.fit + args.apply)
    written = topics.write_with_topics(
        paths, args.output_dir, vectors_for, classnames=classnames, batch=4096
    )
    _copy_sidecars(paths, args.output_dir)
    summary = {
        "kind": args.kind,
        "dim": model.dim,
        "vocabulary": len(model.vocabulary),
        "fit_documents": len(docs),
        "empty_documents": empty,
        "records": sum(n for _, n in written),
        "shards": [p for p, _ in written],
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(summary, indent=1))
    for i, words in enumerate(topics.top_words(model)[:10]):
        print(f"topic {i:2d}: {' '.join(words)}")
    if empty:
        print(f"warning: {empty} fit documents had no text (see --classnames)", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()

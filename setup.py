"""mmssl_jax: multimodal self-supervised pretraining (CLIP, SimCLR, SLIP, UniCL, ...) in JAX."""

from setuptools import find_packages, setup

# Compatible ranges: the lower bound is the version the project is tested on, the upper
# bound the next release that may break an API we use. JAX is installed for CPU here; on
# GPU/TPU install `jax[cuda12]` / `jax[tpu]` first, the ranges below then keep it.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    # tensorflow-datasets provides the tf.train.Example proto (no TensorFlow needed) and
    # the `tfds` make_shards source.
    "tensorflow-datasets>=4.9.10,<5",
    "sentencepiece>=0.2.0,<0.3",
    "ml_collections>=1.1.0,<2",
    "scikit-learn>=1.9.1,<2",
    "numpy>=2.0,<3",
    "absl-py>=2.1,<3",
    # Pillow: host-side JPEG/PNG decode with draft-mode downscaling (the fast path of the
    # input pipeline) and emoji rendering from the Noto font.
    "pillow>=11.0,<14",
    # tqdm: progress bars with rate and ETA for shard writing, training and evaluation.
    "tqdm>=4.66,<5",
    # matplotlib: loss curves, confusion matrices and t-SNE maps as PNG.
    "matplotlib>=3.8,<4",
    # safetensors: pickle-free parameter files for exports.
    "safetensors>=0.4,<1",
    # flatbuffers: needed by jax.export to serialize StableHLO artifacts.
    "flatbuffers>=24.3,<27",
    # google-crc32c: C CRC-32C for TFRecord framing (pure Python would dominate read time).
    "google-crc32c>=1.5,<2",
    # regex: \p{L} / \p{N} classes of CLIP's BPE pre-tokenizer
    # (input_pipeline/tokenizers/clip_bpe.py).
    "regex>=2026.5,<2028",
    # tokenizers: Hugging Face's Rust WordPiece, reading a BERT tower's tokenizer.json as is
    # (input_pipeline/tokenizers/wordpiece.py); a hand-written WordPiece would have to match
    # its normaliser and pre-tokeniser byte for byte.
    "tokenizers>=0.23.3,<1",
]

EXTRAS = {
    # gensim: word2vec document vectors for text-topic targets (tools/fit_topics.py); LDA and
    # TF-IDF/LSA come from scikit-learn. A trained skip-gram is not worth hand-writing.
    "topics": ["gensim>=4.4,<5"],
    # opencv-python-headless: the host crop-resize (input_pipeline/transforms.py) is ~1.7x
    # faster per sample than Pillow's (tools/benchmarks/input.py); Pillow is the fallback.
    "opencv": ["opencv-python-headless>=4.8,<6"],
    "dev": [
        "pytest>=8,<10",
        # pytest-xdist: the suite on every core (`-n auto --dist loadfile`); one process
        # leaves a 2-core machine at ~1.4 cores.
        "pytest-xdist>=3.6,<4",
        "ruff>=0.6",
        "nbclient>=0.10,<1",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        # ftfy: open_clip's reference tokenizer needs it
        # (tests/input_pipeline/tokenizers/test_clip_bpe.py); clip_bpe uses it too when
        # present, as CLIP does.
        "ftfy>=6.3,<7",
    ],
    # The PyTorch reference for benchmarks and the weight-import parity tests (CPU build).
    "torch": ["torch>=2.9,<2.14"],
}

setup(
    name="mmssl_jax",
    version="0.1.0",
    description="Multimodal self-supervised pretraining of visual encoders in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(
        include=["mmssl_jax", "mmssl_jax.*", "input_pipeline", "input_pipeline.*", "configs"]
    ),
    package_data={"input_pipeline": ["templates/*.json", "templates/classnames/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)

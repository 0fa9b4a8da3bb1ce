"""Exports: writing the directory format from a run, `load_pretrained`, and PyTorch (CLIP,
open_clip, SLIP) weight conversion into the same format (`export.convert_torch`).

    export_checkpoint(workdir, output)   # what tools/export.py runs
    model = load_pretrained(output)      # encode_images / encode_texts / zero_shot_classifier
"""

from mmssl_jax.export.pretrained import PretrainedModel, load_pretrained
from mmssl_jax.export.writer import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    export_checkpoint,
    export_stablehlo,
    image_embed_fn,
    preprocess_spec,
    text_embed_fn,
    write_export,
)
from mmssl_jax.models.saved import (
    MANIFEST,
    MODEL,
    PARAMS,
    PREPROCESS,
    TOKENIZER,
    ExportError,
    check_variables,
    expected_shapes,
    flatten_variables,
    unflatten_variables,
    verify_export,
    write_manifest,
)
from mmssl_jax.training.restore import load_config, restore_variables

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MANIFEST",
    "MODEL",
    "PARAMS",
    "PREPROCESS",
    "TOKENIZER",
    "ExportError",
    "PretrainedModel",
    "check_variables",
    "expected_shapes",
    "export_checkpoint",
    "export_stablehlo",
    "flatten_variables",
    "image_embed_fn",
    "load_config",
    "load_pretrained",
    "preprocess_spec",
    "restore_variables",
    "text_embed_fn",
    "unflatten_variables",
    "verify_export",
    "write_export",
    "write_manifest",
]

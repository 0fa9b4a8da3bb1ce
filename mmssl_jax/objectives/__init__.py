"""Loss terms: one masked contrastive core, the named terms, and their weighted sum.

Importing the package registers every built-in term (each in its own file) and the model
outputs they read (objectives/outputs.py).
"""

from mmssl_jax.objectives.contrastive import (
    clip_loss,
    gdt_masks,
    simclr_loss,
    supcon_loss,
    unicl_loss,
    unicl_target_ids,
)
from mmssl_jax.objectives.core import column_offset, gather_rows, masked_contrastive
from mmssl_jax.objectives.gdt import gdt_loss
from mmssl_jax.objectives.mocov3 import mocov3_loss
from mmssl_jax.objectives.registry import (
    Term,
    batch_keys,
    get_term,
    model_parts,
    needed_inputs,
    register_term,
    term_names,
    total_loss,
)
from mmssl_jax.objectives.rotation import rotate_batch, rotation_loss
from mmssl_jax.objectives.siglip import siglip_loss
from mmssl_jax.objectives.topics import (
    topic_bce_loss,
    topic_contrastive_loss,
    topic_mse_loss,
    topic_softmax_loss,
    topic_triplet_loss,
)

__all__ = [
    "Term",
    "batch_keys",
    "clip_loss",
    "column_offset",
    "gather_rows",
    "gdt_loss",
    "gdt_masks",
    "get_term",
    "masked_contrastive",
    "mocov3_loss",
    "model_parts",
    "needed_inputs",
    "register_term",
    "rotate_batch",
    "rotation_loss",
    "siglip_loss",
    "simclr_loss",
    "supcon_loss",
    "term_names",
    "topic_bce_loss",
    "topic_contrastive_loss",
    "topic_mse_loss",
    "topic_softmax_loss",
    "topic_triplet_loss",
    "total_loss",
    "unicl_loss",
    "unicl_target_ids",
]

"""Loss terms: one masked contrastive core, the named terms, and their weighted sum."""

from mmssl_jax.objectives.contrastive import (
    clip_loss,
    gdt_masks,
    simclr_loss,
    supcon_loss,
    unicl_loss,
    unicl_target_ids,
)
from mmssl_jax.objectives.core import column_offset, gather_rows, masked_contrastive
from mmssl_jax.objectives.registry import (
    Term,
    get_term,
    needed_inputs,
    register_term,
    term_names,
    total_loss,
)
from mmssl_jax.objectives.siglip import siglip_loss

__all__ = [
    "Term",
    "clip_loss",
    "column_offset",
    "gather_rows",
    "gdt_masks",
    "get_term",
    "masked_contrastive",
    "needed_inputs",
    "register_term",
    "siglip_loss",
    "simclr_loss",
    "supcon_loss",
    "term_names",
    "total_loss",
    "unicl_loss",
    "unicl_target_ids",
]

"""Flax encoders and heads, selected by name from a registry."""

from mmssl_jax.models.heads import MLPHead, Projection, simclr_head
from mmssl_jax.models.model import MultimodalModel
from mmssl_jax.models.registry import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    build_model,
    get_image_encoder,
    get_text_encoder,
)
from mmssl_jax.models.resnet import ResNet
from mmssl_jax.models.text import TextTransformer
from mmssl_jax.models.vit import VisionTransformer

__all__ = [
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "MultimodalModel",
    "Projection",
    "ResNet",
    "MLPHead",
    "TextTransformer",
    "VisionTransformer",
    "build_model",
    "get_image_encoder",
    "get_text_encoder",
    "simclr_head",
]

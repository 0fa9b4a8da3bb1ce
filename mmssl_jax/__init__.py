"""mmssl_jax: multimodal self-supervised pretraining of visual encoders in JAX/Flax."""

__version__ = "0.1.0"


def load_pretrained(path: str, **kwargs):
    """Loads an export made by tools/export.py (see mmssl_jax.export.load_pretrained)."""
    from mmssl_jax.export import load_pretrained as _load

    return _load(path, **kwargs)

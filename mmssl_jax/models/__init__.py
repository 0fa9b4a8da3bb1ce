"""Flax encoders and heads, selected by name from a registry."""

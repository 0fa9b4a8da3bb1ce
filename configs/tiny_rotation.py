"""Tiny CPU config: rotation (recipe in configs/common.py) on the embedded default data."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("rotation", "tiny", arg)

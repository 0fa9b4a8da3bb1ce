"""Tiny CPU config: mocov3 (recipe in configs/common.py) on the embedded default data."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("mocov3", "tiny", arg)

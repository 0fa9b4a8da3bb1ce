"""Tiny CPU config: slip_mocov3 (recipe in configs/common.py) on the embedded default data."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("slip_mocov3", "tiny", arg)

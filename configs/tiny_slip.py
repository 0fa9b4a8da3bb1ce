"""SLIP with the tiny CPU towers on the embedded default data (SLIP's published recipe; sizes from configs/common.py)."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("slip", "tiny", arg)

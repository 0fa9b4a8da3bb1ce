"""slip_mocov3 with ViT-S/16 (recipe in configs/common.py)."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("slip_mocov3", "vits", arg)

"""UniCL with a ViT-L/16 image tower (SLIP's published recipe; sizes from configs/common.py)."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("unicl", "vitl", arg)

"""SigLIP with the tiny CPU towers on the embedded default data."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("siglip", "tiny", arg)

"""LiT with the tiny CPU towers on the embedded data: a frozen tiny image tower (from a
tiny_simclr/tiny_clip workdir or export: `init=`) and a text tower trained from scratch.
See configs/lit_vitb.py for the options (lock=image|text, open_blocks=K)."""

from configs.lit_vitb import lit_recipe


def get_config(arg=None):
    return lit_recipe("tiny", arg)

"""LiT ("locked-image tuning", Zhai et al. 2022): train a text tower against a pretrained,
frozen image tower with the CLIP loss.

    python -m mmssl_jax.main --workdir=LIT \\
        --config=configs/lit_vitb.py:init=EXPORT_OR_WORKDIR,data=DATA_ROOT

`init` holds the pretrained image tower (an export, a converted checkpoint or a training
workdir of the same image encoder); only `image_encoder/*` is read from it, everything else
starts fresh. The lock is a freeze rule (mmssl_jax/training/param_rules.py; the table of rules and
the parameters they decide is printed at start-up):

    lock=image      the image tower is frozen (default); open_blocks=K trains its last K
                    blocks and final norm ("LiT with unlocked top layers")
    lock=text       the text tower is frozen instead (init must then hold the text tower)

The image projection, text tower and logit scale train (frozen parameters carry no
optimizer state). The data and evaluations are the recipe's (configs/common.py).
"""

import ml_collections

from configs.common import DATA_ROOT, parse_arg, recipe
from configs.finetune_vitb import _depth
from mmssl_jax.training import param_rules

TOWER = {"image": "image_encoder", "text": "text_encoder"}


def lit_recipe(size: str, arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """The LiT config for model `size` (CLIP objective, one tower locked)."""
    base = dict(init="", data=DATA_ROOT, lock="image", open_blocks=0)
    base.update(defaults)
    args = parse_arg(arg, **base)
    lock = args["lock"]  # item access: ConfigDict.lock is a method
    if lock not in TOWER:
        raise ValueError(f"lock={lock!r}; valid: {sorted(TOWER)}")
    if not args.init:
        raise ValueError("LiT needs `init=` (the pretrained tower) in the config arg")
    config = recipe("clip", size, f"data={args.data}")
    tower = TOWER[lock]
    config.init_from.path = args.init
    # Read only the locked tower; everything else starts from its initialisation.
    config.init_from.skip = (f"(?!{tower}/).*",)
    depth = _depth(config, lock)
    config.optim.freeze = tuple(
        param_rules.lock_tower(tower, depth=depth, unlocked_last=args.open_blocks)
    )
    return config


def get_config(arg=None):
    return lit_recipe("vitb", arg)

"""The config of the fault tests: tiny CLIP on the embedded data, small and fast.

`--config=tests/faults/fault_config.py:data=ROOT` for `python -m mmssl_jax.main`; the tests
that train in-process import `get_config` too, so every run shares one compiled train step
(through the persistent compilation cache). One device: the faults under test do not depend
on sharding, and one device compiles and steps fastest on a 2-core machine.
"""

from configs.common import recipe

TOTAL_STEPS = 24
CKPT_EVERY = 4


def get_config(arg=None):
    config = recipe("clip", "tiny", arg)
    config.train.update(
        dict(
            batch_size=16,
            total_steps=TOTAL_STEPS,
            log_every=1,  # one row per step: the loss curve compares step by step
            ckpt_every=CKPT_EVERY,
            keep_ckpts=3,
            num_devices=1,
            progress=False,
        )
    )
    config.optim.warmup_steps = 2
    config.data.num_threads = 1
    config.evals = {}
    return config

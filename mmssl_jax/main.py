"""Entry point: `python -m mmssl_jax.main --config=configs/slip_vits.py --workdir=DIR`.

--mode=train trains (resuming from the workdir's latest checkpoint) and evaluates at the end;
--mode=eval evaluates the latest checkpoint. The resolved config is printed and written to
`workdir/config.json`; overrides go on the command line as `--config.train.batch_size=256`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmssl_jax.config_utils import check_keys, override_keys
from mmssl_jax.parallel import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:arg]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (then evaluate) or evaluate.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()  # --distributed, --coordinator_address, --num_processes, ...


def _check_overrides(argv: list[str]) -> None:
    """Before absl parses: an unknown `--config.x` names the nearest valid keys."""
    path = next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
        None,
    )
    keys = override_keys(argv)
    if not path or not keys:
        return
    import importlib.util

    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    try:
        check_keys(keys, config)
    except KeyError as e:
        sys.exit(f"error: {e.args[0]}")


def main(argv: list[str]) -> None:
    del argv
    distributed.initialize_from_flags()  # before anything touches devices
    import jax

    from mmssl_jax.evaluation import hook
    from mmssl_jax.training.trainer import Trainer

    config, workdir = FLAGS.config, FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        print(config)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)
    logging.info("devices: %s", jax.devices())
    if FLAGS.mode == "eval":  # the checkpoint and the evaluation data only
        results = hook.evaluate_checkpoint(config, workdir)
    else:
        trainer = Trainer(config, workdir)
        evaluate = hook.make_evaluate(
            config,
            workdir,
            trainer.model,
            trainer.model_cfg,
            tokenizer=trainer.tokenizer,
            mesh=trainer.mesh,
        )
        trainer.run(evaluate=evaluate)
        if getattr(trainer, "stopped_early", False):
            return  # preempted: the checkpoint is written; evaluate after the resumed run
        results = evaluate(trainer.state, int(jax.device_get(trainer.state.step)))
    if jax.process_index() == 0 and results:
        print("\n".join(f"{k}: {v:.4f}" for k, v in sorted(results.items())))


if __name__ == "__main__":
    _check_overrides(sys.argv)
    app.run(main)

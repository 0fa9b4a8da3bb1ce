"""Entry point: `python -m mmssl_jax.main --config=configs/slip_vits.py --workdir=DIR`.

--mode=train trains (resuming from the workdir's latest checkpoint) and evaluates at the end
(and every `train.eval_every` steps); --mode=eval evaluates the latest checkpoint. The whole
config is checked before the workdir is touched, its data paths are made absolute and its
tokenizer is copied into the workdir (so export and evaluation work from any folder), and it
is written to `workdir/config.json`; a one-line summary is printed. Overrides go on the command
line as `--config.train.batch_size=256`. Library logs below warnings (orbax, jax) are hidden
unless `--verbose`.
"""

from __future__ import annotations

from mmssl_jax.parallel import allocator

if __name__ == "__main__":
    allocator.use_tcmalloc()  # before JAX loads: re-executes once under tcmalloc if installed

import logging as std_logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmssl_jax.config_utils import check_keys, override_keys  # noqa: E402
from mmssl_jax.parallel import distributed  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:arg]).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (then evaluate) or evaluate.")
flags.DEFINE_bool("verbose", False, "Show every library's info logs (orbax, jax, grain).")
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


class _OwnInfoOnly(std_logging.Filter):
    """Passes warnings and errors, and info lines of this project's own modules."""

    OWN = (
        f"{os.sep}mmssl_jax{os.sep}",
        f"{os.sep}input_pipeline{os.sep}",
        f"{os.sep}tools{os.sep}",
    )

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or any(o in record.pathname for o in self.OWN)


def quiet_libraries() -> None:
    """Hides library info lines (about 40 orbax lines per checkpoint, jax's backend probe)."""
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    for name in ("jax._src.xla_bridge", "absl", "orbax"):
        std_logging.getLogger(name).addFilter(_OwnInfoOnly())


def summary_line(config, workdir: str) -> str:
    terms = " + ".join(
        f"{w:g}*{n}" if float(w) != 1.0 else str(n) for n, w, *_ in config.objectives
    )
    text = config.model.get("text_encoder") or "no text tower"
    steps = (
        config.train.total_steps
        if config.train.total_steps > 0
        else f"{config.train.epochs} epochs"
    )
    return (
        f"mmssl_jax: {terms} | {config.model.image_encoder} + {text} | batch "
        f"{config.train.batch_size}, {steps} | config: {os.path.join(workdir, 'config.json')}"
    )


def missing_data_hint(config) -> str:
    """What to run when the training data is not where the config says."""
    shards = [str(src.get("shards")) for src in config.data.sources.values()]
    return (
        f"The config reads training shards from {', '.join(shards)} (cwd {os.getcwd()}).\n"
        "Make the embedded default there with\n"
        "    python tools/make_shards.py embedded --output_dir data\n"
        "or convert your own data (python tools/make_shards.py folder|csv|webdataset|tfds ...,"
        " see the README's Data section) and point the config at its root with\n"
        f"    --config={FLAGS['config'].config_filename}:data=DIR"
    )


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.verbose:
        quiet_libraries()
    # Before anything touches devices; a recipe may ask for emulated CPU devices (on a
    # machine with an accelerator they are not used).
    distributed.initialize_from_flags(default_cpu_devices=FLAGS.config.train.get("cpu_devices", 0))
    import jax

    from mmssl_jax.evaluation import hook, runner
    from mmssl_jax.training.restore import save_config
    from mmssl_jax.training.trainer import Trainer, check_config, pin_paths

    config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
    try:  # everything a typo can break, before the workdir is touched
        check_config(config)
        for name, cfg in (config.get("evals") or {}).items():
            runner.normalize_config(name, cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")
    os.makedirs(workdir, exist_ok=True)
    pin_paths(config, workdir, copy_tokenizer=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(summary_line(config, workdir), flush=True)
        save_config(config, workdir)
    logging.info("devices: %s", jax.devices())
    if FLAGS.mode == "eval":  # the checkpoint and the evaluation data only
        hook.evaluate_checkpoint(config, workdir)
    else:
        try:
            trainer = Trainer(config, workdir)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}\n{missing_data_hint(config)}")
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
        evaluate(trainer.state, int(jax.device_get(trainer.state.step)))
    report = os.path.join(workdir, "eval", "latest.md")
    if jax.process_index() == 0 and config.get("evals") and os.path.exists(report):
        with open(report) as f:  # the side-by-side table: trained, random init, raw pixels
            print(f.read().rstrip() + f"\n\n(written to {report})")


if __name__ == "__main__":
    _check_overrides(sys.argv)
    app.run(main)

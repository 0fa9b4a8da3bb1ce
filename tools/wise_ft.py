"""WiSE-FT: interpolate a fine-tuned run's weights towards the weights it started from.

    python tools/wise_ft.py --config=configs/finetune_tiny.py:init=WORKDIR_OR_EXPORT \\
        --workdir=FINETUNE_DIR --output=OUT_DIR --alpha=0.5
    python -m mmssl_jax.main --config=configs/finetune_tiny.py:init=... --workdir=OUT_DIR \\
        --mode=eval
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmssl_jax.training.wise_ft import wise_ft  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The fine-tuning config (configs/NAME.py).")
flags.DEFINE_string("workdir", None, "The fine-tuning run's workdir.")
flags.DEFINE_string("output", None, "Workdir to write the interpolated checkpoint to.")
flags.DEFINE_float("alpha", 0.5, "0: zero-shot (start) weights, 1: fine-tuned weights.")
flags.DEFINE_string("zero_shot", "", "Start weights (default: config.init_from.path).")
flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv: list[str]) -> None:
    del argv
    wise_ft(FLAGS.config, FLAGS.workdir, FLAGS.output, FLAGS.alpha, FLAGS.zero_shot or None)
    print(
        f"wrote {FLAGS.output} (alpha={FLAGS.alpha}); evaluate with --mode=eval "
        f"--workdir={FLAGS.output}"
    )


if __name__ == "__main__":
    app.run(main)

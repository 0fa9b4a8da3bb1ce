"""Evaluation during training through main's callback (`train.eval_every`), and
`--mode=eval` from the checkpoint and the evaluation data alone."""

from __future__ import annotations

import json

from configs.tiny_clip import get_config
from mmssl_jax.evaluation import hook
from mmssl_jax.training.trainer import Trainer


def _config(data):
    config = get_config(f"data={data}")
    config.model.image_overrides = {"depth": 1}
    config.model.text_overrides = {"layers": 1}
    config.train.update(batch_size=16, total_steps=4, log_every=2, eval_every=2, progress=False)
    retrieval = dict(config.evals.emoji_retrieval)
    retrieval.update(limit=64, baselines=False, plots=False)
    config.evals = {"emoji_retrieval": retrieval}
    return config


def test_eval_every_evaluates_during_training_and_eval_mode_needs_no_training_data(
    embedded_data, tmp_path
):
    config = _config(embedded_data)
    workdir = str(tmp_path / "run")
    trainer = Trainer(config, workdir)
    evaluate = hook.make_evaluate(
        config, workdir, trainer.model, trainer.model_cfg, tokenizer=trainer.tokenizer
    )
    trainer.run(evaluate=evaluate)
    final = evaluate(trainer.state, 4)
    history = [json.loads(line) for line in open(tmp_path / "run" / "eval" / "history.jsonl")]
    assert [row["step"] for row in history] == [2, 4]  # one during training, the final one
    assert 0.0 <= history[0]["emoji_retrieval/img2txt_R@1"] <= 1.0

    # --mode=eval: the training shards are gone; the checkpoint and eval data suffice.
    config.data.sources.emoji.shards = str(tmp_path / "gone" / "*.tfrecord")
    again = hook.evaluate_checkpoint(config, workdir)
    assert again == final  # the same checkpoint, the same numbers

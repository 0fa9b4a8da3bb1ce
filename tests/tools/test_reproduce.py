"""tools/reproduce.py: cells train and evaluate through the project's Trainer, a finished
cell is never run again (a stopped comparison resumes), and the table's mean +- std over
seeds matches numpy."""

import json

import numpy as np
import pytest

from configs.common import finetune_evals
from input_pipeline import tfrecord
from tools import finetune_eval, reproduce


def _cell(method, seed, top1, r1):
    return {
        "method": method,
        "seed": seed,
        "train_s": 60.0,
        "metrics": {"zs/top1": top1, "ret/img2txt_R@1": r1, "ret/img2txt_mAP": 0.5},
        "baselines": {"raw_pixels": {"zs/top1": 0.1}, "random_init": {"zs/top1": 0.05}},
    }


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    cells = [_cell("clip", s, t, r) for s, t, r in ((0, 0.2, 0.3), (1, 0.4, 0.1), (2, 0.3, 0.2))]
    cells.append(_cell("slip", 0, 0.5, 0.6))
    assert reproduce.columns(cells) == ["ret/img2txt_R@1", "zs/top1"]  # not mAP
    summary = reproduce.summarize(cells)
    np.testing.assert_allclose(summary["clip"]["zs/top1"]["mean"], 0.3)
    np.testing.assert_allclose(summary["clip"]["zs/top1"]["std"], np.std([0.2, 0.4, 0.3], ddof=1))
    assert summary["slip"]["zs/top1"]["n"] == 1 and np.isnan(summary["slip"]["zs/top1"]["std"])
    args = reproduce.parse_args(["--output", str(tmp_path)])
    reproduce.write_outputs(args, cells, "python tools/reproduce.py")
    table = (tmp_path / "reproduce.md").read_text()
    assert "| clip (CLIP, text transformer from scratch) | 20.0 ± 10.0 | 30.0 ± 10.0 |" in table
    assert "*raw pixels*" in table and (tmp_path / "reproduce.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "reproduce.json").read_text())["baselines"]["raw_pixels"]


def test_override_of_an_unknown_key_names_the_nearest(tmp_path):
    out = ["--output", str(tmp_path), "--steps=5"]
    args = reproduce.parse_args([*out, "--override=train.log_evry=1"])
    with pytest.raises(SystemExit, match="train.log_evry.*Did you mean: train.log_every"):
        reproduce.cell_config(args, "clip", 0)
    args = reproduce.parse_args([*out, "--override=train.log_every=7"])
    assert reproduce.cell_config(args, "clip", 0).train.log_every == 7


def test_every_method_gets_the_clip_recipes_budget(embedded_data, tmp_path):
    """Without --steps each cell trains the CLIP recipe's epochs over the emoji pairs, warmup
    one such epoch, even where a mixture (UniCL + Fashion-MNIST) makes an epoch far longer."""
    args = reproduce.parse_args([f"--data={embedded_data}", f"--output={tmp_path}"])
    emoji = len(tfrecord.TFRecordSource(str(embedded_data / "emoji" / "emoji-train-*.tfrecord")))
    clip = reproduce.cell_config(args, "clip", 0)
    per_epoch = emoji // clip.train.batch_size
    unicl = reproduce.cell_config(args, "unicl", 0)
    assert len(unicl.data.sources) == 2  # the mixture
    for config in (clip, unicl, reproduce.cell_config(args, "slip", 1)):
        assert config.train.total_steps == round(clip.train.epochs * per_epoch)
        assert config.optim.warmup_steps == per_epoch
    args = reproduce.parse_args([f"--data={embedded_data}", "--steps=9"])
    assert reproduce.cell_config(args, "unicl", 0).train.total_steps == 9
    override = [f"--data={embedded_data}", "--override=optim.warmup_steps=3"]
    assert reproduce.cell_config(reproduce.parse_args(override), "clip", 0).optim.warmup_steps == 3


def test_cells_run_once_and_resume(embedded_data, tmp_path, monkeypatch):
    retrieval = {
        "type": "retrieval",
        "shards": str(embedded_data / "emoji" / "emoji-test-*.tfrecord"),
        "image_size": 32,
        "limit": 64,
        "plots": False,
        "raw_pixel_size": 8,
    }
    argv = [
        f"--data={embedded_data}",
        f"--output={tmp_path}",
        "--methods=clip",
        "--seeds=0,1",
        "--steps=2",
        "--batch_size=16",
        f"--override=evals={{'emoji_retrieval': {retrieval!r}}}",
        "--override=train.log_every=1",
    ]
    cells = reproduce.main(argv)
    assert [(c["method"], c["seed"]) for c in cells] == [("clip", 0), ("clip", 1)]
    assert cells[0]["metrics"]["emoji_retrieval/img2txt_R@1"] >= 0
    assert cells[0]["baselines"]["random_init"]  # the evaluator's baselines come along
    assert cells[0]["metrics"] != cells[1]["metrics"]  # the seed changes the run

    # Finished cells are read back, never trained again.
    class NoTraining:
        def __init__(self, *a, **k):
            raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("mmssl_jax.training.trainer.Trainer", NoTraining)
    assert reproduce.main(argv) == cells

    # An evaluation a finished cell lacks (SLIP's fine-tune protocol, cut to a few images)
    # runs on its checkpoint and joins its cell.json; nothing trains, nothing else reruns.
    finetune = {
        "emoji_retrieval": retrieval,
        "emoji_finetune": dict(
            finetune_evals(str(embedded_data))["emoji_finetune"],
            train_limit=32,
            test_limit=32,
            epochs=1,
            batch_size=16,
        ),
    }
    later = [a for a in argv if not a.startswith("--override=evals")]
    later.append(f"--override=evals={finetune!r}")
    grown = reproduce.main(later)
    for before, after in zip(cells, grown, strict=True):
        assert after["evals"] == ["emoji_finetune", "emoji_retrieval"]
        assert 0 <= after["metrics"]["emoji_finetune/top1"] <= 1
        assert {k: v for k, v in after["metrics"].items() if "finetune" not in k} == before[
            "metrics"
        ]
    assert "emoji_finetune/top1" in grown[0]["baselines"]["random_init"]  # the first seed's
    assert "emoji_finetune/top1" not in grown[1]["baselines"]["random_init"]
    assert reproduce.main(later)[1]["late_eval_s"] == grown[1]["late_eval_s"]  # not rerun

    # Each cell keeps its config, so the project's tools read it like any run.
    run = tmp_path / "runs" / "clip_s0"
    tool = finetune_eval.main(
        [f"--workdir={run}", f"--output={tmp_path / 'ft'}", f"--data={embedded_data}"]
        + ["--eval=emoji_finetune", "--set=train_limit=32", "--set=test_limit=32"]
        + ["--set=epochs=1", "--set=batch_size=16"]
    )
    assert tool["emoji_finetune/top1"] == pytest.approx(grown[0]["metrics"]["emoji_finetune/top1"])
    with pytest.raises(SystemExit, match="unknown method"):
        reproduce.main(["--methods=nope", f"--output={tmp_path}"])

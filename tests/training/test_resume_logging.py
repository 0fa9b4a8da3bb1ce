"""A run stopped at a step that is not a logging boundary and resumed logs exactly the rows
of an uninterrupted run (the steps since the last row travel with the checkpoint), with
step_time and data_time beside img/s in every row."""

from __future__ import annotations

import json

from configs.tiny_clip import get_config
from mmssl_jax.training.trainer import Trainer

TIMING = ("img_per_s", "step_time", "data_time")


def _config(data):
    config = get_config(f"data={data}")
    config.model.image_overrides = {"depth": 1}
    config.model.text_overrides = {"layers": 1}
    config.train.update(batch_size=16, total_steps=8, log_every=4, ckpt_every=100, progress=False)
    config.evals = {}
    return config


def _rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert all(row[k] > 0 for k in ("img_per_s", "step_time")) and row["data_time"] >= 0
        for key in TIMING:
            row.pop(key)
    return rows


def test_resumed_run_logs_the_rows_of_an_uninterrupted_run(embedded_data, tmp_path):
    Trainer(_config(embedded_data), str(tmp_path / "ref")).run()
    stopped = Trainer(_config(embedded_data), str(tmp_path / "chain"))
    stopped.run(stop_at=6)  # mid-row: steps 5 and 6 are not logged yet
    assert getattr(stopped, "stopped_early", False)
    Trainer(_config(embedded_data), str(tmp_path / "chain")).run()
    reference, chain = _rows(tmp_path / "ref"), _rows(tmp_path / "chain")
    assert [r["step"] for r in reference] == [4, 8]
    assert chain == reference

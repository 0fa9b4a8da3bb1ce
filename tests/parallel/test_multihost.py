"""2 processes x 2 emulated CPU devices (Gloo) train like 1 process x 4 devices.

The processes are this file run as a script (`python tests/parallel/test_multihost.py worker ...`),
joined with `mmssl_jax.parallel.distributed.initialize` on a free localhost port. Each process reads
its own slice of the shards (grain: records `process_index::process_count`, batch 16 / 2),
feeds it with `jax.make_array_from_process_local_data`, trains the tiny CLIP config through
`Trainer.run` (orbax checkpoints written by both processes into one directory) and only
process 0 writes the metrics. The reference runs the same steps in one process on 4 devices,
fed with the same global batches (the two process slices concatenated, which is the global
batch the 2-process run assembles).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, STEPS, CKPT_EVERY = 16, 4, 2


def tiny_clip_config(data_root: str, **train):
    config = importlib.import_module("configs.tiny_clip").get_config(f"data={data_root}")
    config.train.update(
        dict(
            batch_size=BATCH,
            total_steps=STEPS,
            log_every=1,
            ckpt_every=CKPT_EVERY,
            progress=False,
        )
    )
    config.train.update(train)
    # Two blocks per tower instead of four: the same code paths at half the compile time.
    config.model.image_overrides = {"depth": 2}
    config.model.text_overrides = {"layers": 2}
    config.data.num_threads = 1
    config.optim.warmup_steps = 1
    config.evals = {}
    return config


# ----------------------------------------------------------------------------- worker


def worker(port: int, process_id: int, data_root: str, workdir: str, out: str) -> None:
    """One of the two processes: join, train, report what this process saw."""
    from mmssl_jax.parallel import distributed

    cfg = distributed.DistributedConfig(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        num_cpu_devices=2,
        initialization_timeout=60,
    )
    assert distributed.initialize(cfg)
    import jax

    from mmssl_jax.training.metrics_writer import read_metrics
    from mmssl_jax.training.trainer import Trainer

    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    t0 = time.perf_counter()
    config = tiny_clip_config(data_root)
    trainer = Trainer(config, workdir)
    trainer.run()
    report = {
        "process_index": jax.process_index(),
        "seconds": time.perf_counter() - t0,
        "final_step": int(jax.device_get(trainer.state.step)),
        "restore_matches": _restore_matches(trainer, config, workdir),
    }
    if jax.process_index() == 0:
        report["losses"] = [row["loss"] for row in read_metrics(workdir)]
    with open(out, "w") as f:
        json.dump(report, f)
    distributed.shutdown()


def _restore_matches(trainer, config, workdir: str) -> bool:
    """Restores the last checkpoint (train state + this process's iterator) in every process
    and checks it equals the live state and continues with the same next batch."""
    import jax
    import numpy as np

    from input_pipeline import pipeline
    from mmssl_jax.training.checkpoint import Checkpointer

    fresh_iter = pipeline.make_train_iterator(
        config.data,
        global_batch_size=BATCH,
        needs=trainer.batch_keys,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    ckpt = Checkpointer(workdir)
    try:
        restored = ckpt.restore(trainer.abstract_state(), fresh_iter, STEPS)
    finally:
        ckpt.close()
    same_state = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.state), strict=True)
    )
    want, got = next(trainer.data_iter), next(fresh_iter)
    same_batch = all(np.array_equal(want[k], got[k]) for k in want)
    return bool(same_state and same_batch)


# ----------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference_losses(data_root: str) -> list[float]:
    """One process, 4 of the 8 test devices, the same global batches as the 2-process run."""
    import jax
    import numpy as np

    from input_pipeline import pipeline
    from mmssl_jax.parallel import mesh as parallel
    from mmssl_jax.training.trainer import Trainer

    assert jax.device_count() >= 4
    config = tiny_clip_config(data_root, num_devices=4)
    trainer = Trainer(config, "/nonexistent-unused")
    slices = [
        pipeline.make_train_iterator(
            config.data,
            global_batch_size=BATCH,
            needs=trainer.batch_keys,
            process_index=i,
            process_count=2,
        )
        for i in range(2)
    ]
    state = trainer._init(config.seed)
    losses = []
    for _ in range(STEPS):
        parts = [next(it) for it in slices]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = trainer.train_step(state, parallel.to_global(batch, trainer.mesh))
        losses.append(float(metrics["loss"]))
    return losses


def test_distributed_plan_from_flags_and_environment():
    import pytest

    from mmssl_jax.parallel import distributed as d

    explicit = d.config_from_env(
        {
            "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
            "JAX_NUM_PROCESSES": "4",
            "JAX_PROCESS_ID": "3",
        }
    )
    assert (explicit.coordinator_address, explicit.num_processes, explicit.process_id) == (
        "10.0.0.1:1234",
        4,
        3,
    )
    assert d.plan(explicit, {}) == "explicit"
    # Keyword overrides (flags) win over the environment.
    assert d.config_from_env({"JAX_PROCESS_ID": "3"}, process_id=1).process_id == 1
    assert d.config_from_env({"MMSSL_DISTRIBUTED": "on"}, mode="off").mode == "off"
    assert d.plan(d.DistributedConfig(mode="off"), {"SLURM_NTASKS": "8"}) == "off"
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "0",
    }
    assert d.plan(d.DistributedConfig(), slurm) == "slurm"
    assert d.plan(d.DistributedConfig(), {**slurm, "SLURM_NTASKS": "1"}) == "off"
    assert d.plan(d.DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert d.plan(d.DistributedConfig(), {"OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert d.plan(d.DistributedConfig(), {}) == "off"
    with pytest.raises(RuntimeError, match="no launcher detected"):
        d.plan(d.DistributedConfig(mode="on"), {})
    partial = d.DistributedConfig(coordinator_address="h:1", num_processes=2)
    assert d.plan(partial, slurm) == "slurm"  # the launcher fills in the process id
    with pytest.raises(ValueError, match="needs all of"):
        d.plan(partial, {})
    with pytest.raises(ValueError, match="not in"):
        d.DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=2)


def test_two_processes_equal_one_process(embedded_data, tmp_path):
    port = _free_port()
    env = dict(os.environ)
    # Each worker sets its own device count (jax_num_cpu_devices=2); drop the test's 8.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    workdir = tmp_path / "run"
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "worker",
                str(port),
                str(i),
                str(embedded_data),
                str(workdir),
                str(outs[i]),
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    reference = _reference_losses(str(embedded_data))  # overlaps with the workers
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    reports = [json.loads(o.read_text()) for o in outs]

    assert [r["final_step"] for r in reports] == [STEPS, STEPS]
    assert [r["restore_matches"] for r in reports] == [True, True]
    # Only process 0 writes logs: one metrics file with one row per step.
    losses = reports[0]["losses"]
    assert len(losses) == STEPS and "losses" not in reports[1]
    # Orbax checkpoints written by both processes into the shared workdir.
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [CKPT_EVERY, STEPS]
    import numpy as np

    np.testing.assert_allclose(losses, reference, rtol=1e-6, atol=0)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    port, pid, data, wd, out = sys.argv[2:7]
    worker(int(port), int(pid), data, wd, out)


def test_a_recipes_cpu_devices_apply_only_where_flag_and_environment_are_silent():
    """`train.cpu_devices` (the quick start asks for 2) fills in --num_cpu_devices only when
    neither the flag nor MMSSL_NUM_CPU_DEVICES set it; 0 leaves JAX's default."""
    import importlib

    from mmssl_jax.parallel import distributed as d

    quick = importlib.import_module("configs.tiny_minilm").get_config()
    assert quick.train.cpu_devices == 2
    assert importlib.import_module("configs.tiny_clip").get_config().train.cpu_devices == 0
    silent = d.config_from_env({})
    assert d.with_default_cpu_devices(silent, 2).num_cpu_devices == 2
    assert d.with_default_cpu_devices(silent, 0).num_cpu_devices is None
    from_env = d.config_from_env({"MMSSL_NUM_CPU_DEVICES": "4"})
    assert d.with_default_cpu_devices(from_env, 2).num_cpu_devices == 4
    from_flag = d.config_from_env({}, num_cpu_devices=1)
    assert d.with_default_cpu_devices(from_flag, 2).num_cpu_devices == 1

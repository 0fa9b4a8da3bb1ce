"""Multi-process start-up: `jax.distributed.initialize()` from flags or the environment.

Call `initialize()` (or `initialize_from_flags(FLAGS)` in an absl main) before anything that
touches devices. What it does, first match wins:

1. `mode="off"` (flag `--distributed=off`, env `MMSSL_DISTRIBUTED=off`): one process.
2. An explicit coordinator address, process count and process id, all three (flags
   `--coordinator_address --num_processes --process_id`, or the env variables
   `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`): used as given. This is
   the way for processes on one machine, or any cluster JAX does not recognise.
3. A cluster JAX detects by itself: a SLURM job step with more than one task (`srun`), a
   Cloud TPU VM (pod slice or single host), an Open MPI launch with more than one rank. Then
   `jax.distributed.initialize()` is called with whatever of the three was given and JAX
   reads the rest from the launcher.
4. Otherwise one process, nothing to initialise (`mode="on"` makes that an error instead).

`num_cpu_devices` sets `jax_num_cpu_devices` first, so each process can emulate several CPU
devices (tests; cross-process CPU collectives use Gloo).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence

import jax
from absl import flags, logging

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How (and whether) to join a multi-process JAX run; None fields are left to JAX."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    num_cpu_devices: int | None = None
    initialization_timeout: int = 300

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"distributed mode must be one of {MODES}, got {self.mode!r}")
        n, i = self.num_processes, self.process_id
        if n is not None and i is not None and not 0 <= i < n:
            raise ValueError(f"process_id {i} not in [0, {n})")

    @property
    def given(self) -> tuple[str | None, int | None, int | None]:
        return (self.coordinator_address, self.num_processes, self.process_id)

    @property
    def explicit(self) -> bool:
        """All of coordinator address, process count and id are set."""
        return all(x is not None for x in self.given)


def _int_or_none(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


def config_from_env(environ: Mapping[str, str] | None = None, **overrides) -> DistributedConfig:
    """A DistributedConfig from `MMSSL_DISTRIBUTED`, `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS` and `MMSSL_NUM_CPU_DEVICES`;
    keyword `overrides` that are not None win."""
    env = os.environ if environ is None else environ
    ids = env.get("JAX_LOCAL_DEVICE_IDS")
    values = dict(
        mode=env.get("MMSSL_DISTRIBUTED", "auto") or "auto",
        coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
        num_processes=_int_or_none(env.get("JAX_NUM_PROCESSES")),
        process_id=_int_or_none(env.get("JAX_PROCESS_ID")),
        local_device_ids=tuple(int(i) for i in ids.split(",")) if ids else None,
        num_cpu_devices=_int_or_none(env.get("MMSSL_NUM_CPU_DEVICES")),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["local_device_ids"] is not None:
        values["local_device_ids"] = tuple(int(i) for i in values["local_device_ids"])
    return DistributedConfig(**values)


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher JAX can read by itself: "slurm", "tpu", "ompi" or None.

    SLURM counts only inside a job step with more than one task (`srun -n 2 ...`); an
    `sbatch` script that runs python directly is one process. TPU VMs are recognised by the
    env variables the TPU runtime sets or by TPU chips on the PCI bus.
    """
    env = os.environ if environ is None else environ
    if (
        "SLURM_JOB_ID" in env
        and "SLURM_STEP_NODELIST" in env
        and "SLURM_PROCID" in env
        and int(env.get("SLURM_NTASKS", "1")) > 1
    ):
        return "slurm"
    tpu_vars = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_ACCELERATOR_TYPE")
    if any(env.get(v) for v in tpu_vars):
        return "tpu"
    if environ is None and _has_tpu_chips():
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    return None


def _has_tpu_chips() -> bool:
    """True when a Google TPU chip is on the PCI bus (vendor 0x1ae0), as JAX checks."""
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return False


def plan(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> str:
    """What `initialize` will do: "off", "explicit" or the detected cluster name."""
    if cfg.mode == "off":
        return "off"
    if cfg.explicit:
        return "explicit"
    cluster = detect_cluster(environ)
    if cluster is not None:
        return cluster  # JAX fills in whatever of the three is not given
    if any(x is not None for x in cfg.given):
        raise ValueError(
            "an explicit multi-process start needs all of coordinator_address, num_processes "
            f"and process_id (no SLURM/TPU/MPI launcher to fill them in); got {cfg.given}"
        )
    if cfg.mode == "on":
        raise RuntimeError(
            "distributed mode 'on' but no launcher detected (SLURM step, TPU VM, Open MPI) "
            "and no --coordinator_address/--num_processes/--process_id given"
        )
    return "off"


def initialize(cfg: DistributedConfig | None = None) -> bool:
    """Joins the multi-process run described by `cfg` (default: from the environment).

    Returns True when JAX now runs as several processes. Safe to call twice. Must run before
    JAX creates its backends (any `jax.devices()` or computation).
    """
    cfg = config_from_env() if cfg is None else cfg
    if cfg.num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(cfg.num_cpu_devices))
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    how = plan(cfg)
    if how == "off":
        return False
    if how == "explicit":
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            local_device_ids=cfg.local_device_ids,
            initialization_timeout=cfg.initialization_timeout,
        )
    else:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            local_device_ids=cfg.local_device_ids,
            initialization_timeout=cfg.initialization_timeout,
        )
    if jax.process_index() != 0:
        # Only process 0 logs at INFO; the others report warnings and errors only.
        logging.set_verbosity(logging.WARNING)
    logging.info(
        "jax.distributed (%s): process %d of %d, %d local / %d global devices",
        how,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def barrier(name: str, timeout_s: float = 1800.0) -> None:
    """Waits until every process reaches `name` (no-op with one process).

    Goes through the coordination service, not a device collective: XLA:CPU's Gloo context
    is set up at the first collective and gives up after 30 s, so processes that finish
    compiling far apart (a loaded machine) must meet here before their first step."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client has no public handle

    client = jax_distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(name, int(timeout_s * 1000))


def is_main_process() -> bool:
    """True on the process that writes logs, metrics, configs and reports."""
    return jax.process_index() == 0


def shutdown() -> None:
    """Leaves the multi-process run (no-op when not initialised)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


# ---------------------------------------------------------------------------- absl flags


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --distributed, --coordinator_address, --num_processes, --process_id,
    --local_device_ids and --num_cpu_devices (unset flags fall back to the environment)."""
    flags.DEFINE_enum(
        "distributed",
        None,
        list(MODES),
        "auto: detect SLURM/TPU/MPI; on; off.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0 (explicit multi-process start).",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's id.", flag_values=flag_values)
    flags.DEFINE_list(
        "local_device_ids", None, "Devices this process uses (e.g. 0,1).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "num_cpu_devices", None, "Emulated CPU devices per process.", flag_values=flag_values
    )


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> DistributedConfig:
    """The flags defined by `define_flags`, over the environment."""
    ids: Sequence[str] | None = flag_values.local_device_ids
    return config_from_env(
        mode=flag_values.distributed,
        coordinator_address=flag_values.coordinator_address,
        num_processes=flag_values.num_processes,
        process_id=flag_values.process_id,
        local_device_ids=tuple(int(i) for i in ids) if ids else None,
        num_cpu_devices=flag_values.num_cpu_devices,
    )


def initialize_from_flags(
    flag_values: flags.FlagValues = flags.FLAGS, default_cpu_devices: int = 0
) -> bool:
    """`initialize(config_from_flags(flag_values))`, with `default_cpu_devices` (> 0) where
    neither the flag nor the environment says how many CPU devices to emulate."""
    return initialize(with_default_cpu_devices(config_from_flags(flag_values), default_cpu_devices))


def with_default_cpu_devices(cfg: DistributedConfig, default: int) -> DistributedConfig:
    """`cfg` with `num_cpu_devices=default` when it has none and `default` > 0 (a recipe's
    `train.cpu_devices`; the --num_cpu_devices flag and MMSSL_NUM_CPU_DEVICES win)."""
    if cfg.num_cpu_devices is not None or default <= 0:
        return cfg
    return dataclasses.replace(cfg, num_cpu_devices=int(default))

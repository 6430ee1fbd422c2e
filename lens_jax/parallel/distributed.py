"""Multi-host start-up: jax.distributed from environment variables (SLURM, TPU VMs, or explicit)."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize when the environment describes several processes.

    Explicit: LENS_COORDINATOR (host:port), LENS_NUM_PROCESSES, LENS_PROCESS_ID (and optionally
    LENS_LOCAL_DEVICE_IDS). Otherwise SLURM / TPU-VM cluster auto-detection when LENS_DISTRIBUTED=1.
    Must run before anything touches JAX devices.
    """
    coordinator = os.environ.get("LENS_COORDINATOR")
    if coordinator:
        local = os.environ.get("LENS_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["LENS_NUM_PROCESSES"]),
            process_id=int(os.environ["LENS_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
        return True
    if os.environ.get("LENS_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False

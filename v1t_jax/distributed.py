"""Joining a multi-process JAX run (TPU pod slices, multi-node GPU) before any JAX use.

`jax.distributed.initialize` must run once per process, before anything touches a device. We
call it when the run is one of several processes:
  * explicit: `coordinator_address` + `num_processes` + `process_id` (launch_train.py flags, or
    the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
  * detected by JAX itself (no arguments): a TPU VM pod slice with several workers, or a SLURM
    job step with several tasks (`srun`), or Open MPI (`mpirun`).
A single process (one CPU, one GPU host with all its GPUs, one TPU VM) needs none of this.
"""

from __future__ import annotations

import os


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def cluster_detected(environ=os.environ) -> str | None:
  """The multi-process environment JAX can auto-detect, or None."""
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "openmpi"
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu pod"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> str | None:
  """Joins the run's processes when there are several; returns how (None: single process)."""
  import jax

  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("a multi-process run needs all of --coordinator_address, --num_processes "
                       "and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                       f"JAX_PROCESS_ID); got {dict(zip(('coordinator_address', 'num_processes', 'process_id'), explicit))}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return None
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=timeout_s)
    return "explicit"
  detected = cluster_detected()
  if detected:
    jax.distributed.initialize(initialization_timeout=timeout_s)
  return detected

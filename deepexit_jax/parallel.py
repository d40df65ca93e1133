"""Data parallelism with JAX's own runtime: a ("data",) mesh, sharded batches, many hosts.

One code path for 1 device, all local devices and several hosts: parameters and
optimizer state are replicated over the mesh, every batch is split along its
first axis, and `jax.jit` (GSPMD) inserts the gradient all-reduce. On several
hosts `initialize_distributed()` (`jax.distributed.initialize`) must run first;
every process then builds the same global batch from the same seeded data
order, and keeps only the rows its own devices hold.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deepexit_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Joins the multi-host runtime (TPU pod slice, several GPU hosts).

  On TPU VMs, SLURM and Open MPI JAX detects the cluster itself. Elsewhere set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID on every host; see README.md, "GPU / TPU".
  """
  kwargs = {}
  for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    value = os.environ.get(name)
    if value is not None:
      if not value.isdigit():
        raise UserError(f"{name}={value!r} must be a non-negative integer")
      kwargs[key] = int(value)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    raise UserError(f"--distributed: jax.distributed.initialize() failed ("
                    f"{' '.join(str(e).split())[:200]}): launch one process per host with "
                    "the coordinator set, or drop --distributed on a single host") from None


def data_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ("data",) mesh over the first `num_devices` devices (0 = all, every host)."""
  devices = jax.devices()
  n = len(devices) if num_devices == 0 else num_devices
  if n > len(devices):
    raise UserError(f"train.num_devices={num_devices} but only {len(devices)} device(s) are "
                    "visible: lower it, or 0 to use every device")
  # Auto axes: the model's code carries no sharding annotations; GSPMD propagates them.
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  if batch_size % mesh.size:
    raise UserError(f"data.batch_size={batch_size} is not divisible by the {mesh.size} "
                    "data-parallel devices: choose a multiple of it, or set train.num_devices")


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every array of `tree` on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Global arrays split along axis 0 over the mesh, from host arrays every process holds."""
  sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  return tuple(
      jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
      for x in map(np.asarray, arrays))


def is_primary() -> bool:
  """True in the one process that writes logs, metrics and reports (process 0)."""
  return jax.process_index() == 0

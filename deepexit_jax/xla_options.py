"""Compiler options of our jitted hot paths, chosen per backend at first use.

On XLA:CPU (jaxlib 0.10) the YNNPACK library fusions of element-wise and
reduction ops are slow for this model: the attention softmax fused into the
probabilities-times-values matmul took a quarter of a training step.
Restricting YNNPACK to plain dots roughly halved the training step (see
BUILD_NOTES.md, Performance). Options are passed per jitted function
(`jax.jit(..., compiler_options=...)`), never through global XLA_FLAGS, and only
if this XLA accepts them; DEEPEXIT_DEFAULT_XLA=1 turns them off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def compiler_options() -> dict[str, Any]:
  """The options for the current default backend ({} where none apply or are known)."""
  if jax.default_backend() != "cpu" or os.environ.get("DEEPEXIT_DEFAULT_XLA") == "1":
    return {}
  try:  # An XLA that does not know an option refuses to compile with it.
    jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS)(jnp.zeros(()))
  except Exception:  # noqa: BLE001 - any refusal means: use XLA's defaults.
    return {}
  return dict(CPU_OPTIONS)


def jit(fn: Callable, **kwargs) -> Callable:
  """`jax.jit(fn, **kwargs)` with `compiler_options()`; call at run time, not import."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)

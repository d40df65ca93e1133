"""The binaries' --help lists each binary's own flags with their help text."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, own_flags", [
    ("deepexit_jax.train", ["--config", "--workdir", "--[no]resume"]),
    ("deepexit_jax.sweep", ["--checkpoint", "--thresholds", "--kv_policy", "--[no]calibrate"]),
    ("deepexit_jax.probes", ["--checkpoint", "--balance"]),
    ("deepexit_jax.decoding", ["--checkpoint", "--prompt", "--[no]speculative",
                               "--draft_layer", "--probe"]),
])
def test_help_lists_the_binarys_own_flags(module, own_flags):
  out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode in (0, 1), out.stderr[-2000:]  # absl exits 1 after --help.
  for flag in own_flags:
    assert f"  {flag}:" in out.stdout, (flag, out.stdout[:3000])
  # Only the binary's own flags, not absl's or JAX's (those are under --helpfull).
  assert "--jax_" not in out.stdout and "--logtostderr" not in out.stdout

"""The binaries' --help lists each binary's own flags with their help text."""

import configparser
import importlib.util
import os
import subprocess
import sys

import pytest

_TRAIN = ["--config", "--workdir", "--[no]resume"]
_SWEEP = ["--checkpoint", "--hf_checkpoint", "--thresholds", "--kv_policy", "--[no]calibrate",
          "--text_file", "--seq_len", "--batch_size"]
_PROBE = ["--checkpoint", "--hf_checkpoint", "--balance", "--text_file", "--seq_len",
          "--batch_size"]
_GENERATE = ["--checkpoint", "--hf_checkpoint", "--prompt", "--[no]speculative",
             "--draft_layer", "--probe"]


@pytest.mark.parametrize("module, own_flags", [
    # The binaries' main modules (setup.cfg's console scripts).
    ("deepexit_jax.main.train", _TRAIN),
    ("deepexit_jax.main.sweep", _SWEEP),
    ("deepexit_jax.main.probe", _PROBE),
    ("deepexit_jax.main.generate", _GENERATE),
])
def test_help_lists_the_binarys_own_flags(module, own_flags):
  out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode in (0, 1), out.stderr[-2000:]  # absl exits 1 after --help.
  for flag in own_flags:
    assert f"  {flag}:" in out.stdout, (flag, out.stdout[:3000])
  # Only the binary's own flags, not absl's or JAX's (those are under --helpfull).
  assert "--jax_" not in out.stdout and "--logtostderr" not in out.stdout


def test_console_scripts_point_at_the_main_modules():
  # Read, not imported: a main module defines its flags on import, and two binaries share
  # flag names (--checkpoint).
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(os.path.dirname(__file__), os.pardir, "setup.cfg"))
  scripts = dict(line.split(" = ") for line in
                 cfg["options.entry_points"]["console_scripts"].strip().splitlines())
  assert set(scripts) == {"deepexit-train", "deepexit-sweep", "deepexit-probe",
                          "deepexit-generate"}
  for name, target in scripts.items():
    module, attr = target.split(":")
    assert module.startswith("deepexit_jax.main."), (name, target)
    with open(importlib.util.find_spec(module).origin) as f:
      assert f"\ndef {attr}() -> None:" in f.read(), (name, target)

"""The four binaries, one thin main module each: flags, then one call into the library.

  train     `deepexit-train`     -> `train.train`
  sweep     `deepexit-sweep`     -> `sweep.run_sweep` (+ `calibration.run_calibration`)
  probe     `deepexit-probe`     -> `probes.run_probes`
  generate  `deepexit-generate`  -> `decoding.generate_text` / `decoding.speculative_text`

Each is also `python -m deepexit_jax.main.<name>`. A main module defines its absl flags
when imported, so import one only to run it; the library modules define no flags.
"""

"""`python -m deepexit_jax.probes`: the `deepexit-probe` binary (`deepexit_jax.main.probe`)."""

from deepexit_jax.main import probe

probe.run()

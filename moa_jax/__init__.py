import sys

if sys.argv[:1] == ["-m"]:  # being started as `python -m moa_jax.<cli>`: a Ctrl-C while modules load is one line
  from moa_jax import cli as _cli
  _cli.early_interrupts()

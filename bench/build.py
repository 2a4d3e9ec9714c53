"""Build the load generators' compiled churn cycle (_cycle.c) in place,
beside the harness: make runs this after installing the package, which the
benchmarks are not part of. Optional, as the package's own extension is:
without a C compiler, churn.py's Python cycle serves.

Run from this directory (`cd bench && python build.py`), away from the
project's pyproject.toml, which setuptools would otherwise apply."""

from setuptools import Extension, setup

setup(
    name="amqplex-bench",
    ext_modules=[Extension("_cycle", ["_cycle.c"], optional=True)],
    script_args=["--quiet", "build_ext", "--inplace"],
)

"""The compiled frame walkers (amqplex/protocol/_walk.c) and the benchmarks'
compiled churn cycle (bench/_cycle.c). Everything else about the package is
in pyproject.toml. Both are optional: where they cannot be built (no C
compiler), framing.py's Python walkers and churn.py's Python cycle serve."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("amqplex.protocol._walk", ["amqplex/protocol/_walk.c"], optional=True),
        Extension("bench._cycle", ["bench/_cycle.c"], optional=True),
    ]
)

"""The compiled frame walkers (amqplex/protocol/_walk.c). Everything else
about the package is in pyproject.toml. The extension is optional: where it
cannot be built (no C compiler), framing.py's Python walkers serve."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("amqplex.protocol._walk", ["amqplex/protocol/_walk.c"], optional=True),
    ]
)

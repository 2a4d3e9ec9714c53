"""The multiprocess metrics directory, owned by the master.

prometheus-client picks its multiprocess mode when it is first imported, so
the directory must be in the environment before that: the command line
calls prepare() before it imports anything that uses metrics.
"""

from __future__ import annotations

import os
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> tuple[str, bool]:
    """A fresh, empty directory in $PROMETHEUS_MULTIPROC_DIR: the one given
    (its leftovers cleared) or a new temporary one. Returns it and whether
    the master made it (and so removes it at exit)."""
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for entry in os.listdir(path):
            if entry.endswith(".db"):
                os.unlink(os.path.join(path, entry))
        return path, False
    path = tempfile.mkdtemp(prefix="amqplex-metrics-")
    os.environ[ENV] = path
    return path, True


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

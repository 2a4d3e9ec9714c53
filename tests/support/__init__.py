"""Test support: the daemon under test, the broker's own view, raw clients."""

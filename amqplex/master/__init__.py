"""The master process: binds the listener, forks and tends the workers,
owns the signals (gunicorn's arbiter model)."""

"""AMQP 0-9-1 wire format: frames, methods, errors and authentication."""

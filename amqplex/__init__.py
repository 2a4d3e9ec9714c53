"""amqplex: an AMQP 0-9-1 multiplexing proxy for RabbitMQ."""

__version__ = "0.1.0"

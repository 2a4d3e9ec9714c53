"""Benchmarks of amqplexd against the broker it fronts, measured in the same run.

Run with `make bench` or `python -m bench --help` from the repository root.
"""

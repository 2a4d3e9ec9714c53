"""A worker: one asyncio loop serving client sessions over its own pools."""

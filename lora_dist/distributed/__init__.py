"""Distributed concerns, and nothing of the training loop: ranks, ZeRO-3, tensor parallelism."""

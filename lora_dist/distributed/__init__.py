"""Distributed concerns: rank discovery, ZeRO-3 gathers, tensor-parallel LoRA, rank-0 I/O."""

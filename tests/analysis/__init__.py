"""Tests of lora_dist.analysis and `lora-dist analyze`."""

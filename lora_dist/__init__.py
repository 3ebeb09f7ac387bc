"""lora-dist: LoRA fine-tuning of large causal LMs on DeepSpeed ZeRO-3 and tensor parallelism."""

__version__ = "0.1.0"

"""The old home of `resolve_model_dir`, which lives in lora_dist.models now."""

from lora_dist.models import resolve_model_dir  # noqa: F401 (its old home)

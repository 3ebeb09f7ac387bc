"""Planning a run before it is queued: model shapes and per-GPU memory."""

"""The training loop and what it needs: trainer, checkpointer, schedule, monitor, evaluation."""

"""Training: one loop for every model, the per-model tasks, checkpoints and the pieces they share."""

"""Training: dialogues to batches, the training loop, and resumable training state."""

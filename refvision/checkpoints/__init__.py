"""Checkpoint reading and trust (weights-only loading, URLs, external weights) and deploy checkpoints."""

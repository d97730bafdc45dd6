"""What runs write for people and evaluators: prediction writers, figures, per-class tables."""

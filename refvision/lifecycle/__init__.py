"""The run lifecycle: ``last`` / ``best`` checkpoints, exact resume, signals, divergence, the deploy checkpoint
at each best."""

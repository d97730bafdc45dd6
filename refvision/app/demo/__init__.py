"""``refvision demo``: the refocus workflow on generated data in the real on-disk formats."""

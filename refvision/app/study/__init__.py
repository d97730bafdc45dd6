"""``refvision study``: method comparisons as arms x seeds, resumable, summarised with paired statistics."""

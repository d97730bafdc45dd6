"""Small helpers every layer may use (no torch, no Lightning)."""

"""imagezoo."""

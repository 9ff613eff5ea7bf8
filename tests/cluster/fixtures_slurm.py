"""Slurm test-cluster fixtures (filled in by the Slurm work)."""

"""Deterministic simulation of reflowd: a simulated cluster, transport and clock behind the real seams."""

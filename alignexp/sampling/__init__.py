"""Sampling: the generation engine, and the ways preference data is drawn from policies."""

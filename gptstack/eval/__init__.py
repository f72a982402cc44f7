"""Evaluation: perplexity, in-context tasks, contamination, calibration, predictable scaling."""

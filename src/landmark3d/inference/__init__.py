"""Inference: the importable predictor and the forward steps shared with validation."""

"""Prediction of validation/test cases with probabilities (filled in by the training and inference issues)."""

"""Orchestration: training one run (as nnU-Net's run/run_training.py), above trainers and inference."""

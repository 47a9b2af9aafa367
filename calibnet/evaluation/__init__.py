"""Metrics, calibration, failure detection and tables; reads prediction files, never imports trainers."""

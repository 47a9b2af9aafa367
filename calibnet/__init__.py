"""calibnet: calibrated, domain-robust segmentation on top of nnU-Net."""

__version__ = "0.1.0"

"""Pure metric definitions shared by inference and evaluation (below both, as MONAI's metrics are)."""

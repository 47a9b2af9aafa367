"""calibnet: calibrated, domain-robust segmentation on top of nnU-Net.

``calibnet.train``, ``calibnet.predict`` and ``calibnet.evaluate`` are the commands as Python calls (see
``calibnet.api``); they are loaded on first use, so ``import calibnet`` stays cheap.
"""

__version__ = "0.1.0"

_API = ("train", "predict", "evaluate", "plan_and_preprocess", "TrainRequest", "PredictRequest")


def __getattr__(name):
    if name in _API:
        from calibnet import api
        return getattr(api, name)
    raise AttributeError(f"module 'calibnet' has no attribute {name!r}")

"""Networks the trainers train and inference runs: SAM / SAM 2 slice segmenters, MPA adapters, SafeClick's
plug-in decoder and the confidence head. Below trainers, inference and evaluation (DESIGN §2)."""

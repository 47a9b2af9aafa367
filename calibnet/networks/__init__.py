"""Networks the trainers train and inference runs: SAM / SAM 2 slice segmenters, MPA adapters, MedSAM-U,
SafeClick's plug-in decoder, MC dropout and the confidence head. Below trainers, inference and evaluation
(DESIGN §2)."""

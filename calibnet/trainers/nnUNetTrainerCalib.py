"""The base of every calibnet trainer: nnU-Net training on one fold of ``calib_splits.json``."""
from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from calibnet.planners.splits import describe_fold, get_fold, load_calib_splits


class nnUNetTrainerCalib(nnUNetTrainer):
    """nnUNetTrainer that trains on the train/val cases of a calibnet split fold.

    nnU-Net silently trains on a random 80:20 split when the fold index is beyond its split file; here
    an unknown fold is an error that lists the valid folds. The fold's test cases (the shifted domain)
    are never handed to training or checkpoint selection.
    """

    split_family = "loco"  # which family of calib_splits.json the fold index refers to

    def do_split(self):
        splits = load_calib_splits(self.preprocessed_dataset_folder_base)
        fold = get_fold(splits, self.split_family, self.fold,
                        where=f"{self.preprocessed_dataset_folder_base}/calib_splits.json")
        self.print_to_log_file(f"calibnet {self.split_family} split, {describe_fold(self.split_family, fold)}: "
                               f"{len(fold['train'])} train, {len(fold['val'])} val, "
                               f"{len(fold['test'])} test cases (test never used in training)")
        return fold["train"], fold["val"]

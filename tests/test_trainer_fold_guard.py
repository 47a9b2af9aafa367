"""nnU-Net falls back to a random 80:20 split for an unknown fold; calibnet trainers refuse."""
import json

import pytest
import torch

from calibnet.errors import CalibnetError
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib

pytestmark = pytest.mark.slow


def _trainer(tiny_dataset, fold, family="loco"):
    tiny_dataset.activate()
    from calibnet.paths import setup_data_roots
    setup_data_roots()
    plans = json.loads((tiny_dataset.preprocessed / "CalibPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((tiny_dataset.preprocessed / "dataset.json").read_text())
    trainer = nnUNetTrainerCalib(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))
    trainer.split_family = family
    return trainer


def test_fold_beyond_the_split_is_an_error_listing_valid_folds(tiny_dataset):
    with pytest.raises(CalibnetError) as e:
        _trainer(tiny_dataset, 7).do_split()
    assert "fold 7 does not exist in the loco split" in str(e.value)
    assert "fold 3 holds out center C4" in str(e.value)


@pytest.mark.parametrize("family, fold", [("loco", 2), ("scanner", 1)])
def test_trainer_gets_the_folds_train_and_val_never_its_test(tiny_dataset, family, fold):
    splits = json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())[family]["folds"][fold]
    train, val = _trainer(tiny_dataset, fold, family).do_split()
    assert (train, val) == (splits["train"], splits["val"])
    assert not set(splits["test"]) & (set(train) | set(val))

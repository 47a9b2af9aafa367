"""calib_export: which methods nnU-Net opens as they are, and the fold folder of one run at a time (a fold_F of
another run is refused unless --overwrite). nnU-Net's own predict and ensemble on calibnet's output:
test_train_predict.py (they use its trained runs)."""
import hashlib
import json
import shutil

import pytest

from calibnet.checkpoints import load_checkpoint
from calibnet.cli import export as export_cli
from calibnet.errors import CalibnetError
from calibnet.launch.export import INFERENCE_KEYS, nnunet_trainer_name
from calibnet.methods import METHODS
from conftest import TINY_ID, TrainedRun, run_cli

NNUNET_NETWORK = {"nnunet", "calunet", "unet_fip", "unet_cmp", "focal", "dicepp"}  # nnU-Net's own network


def test_methods_with_nnunets_network_name_nnunets_trainer_and_the_rest_theirs_or_are_refused():
    for alias, method in METHODS.items():
        if method.uses_sam or method.trains_head or alias == "guided_nnunet":
            with pytest.raises(CalibnetError, match="calib_predict|export the base method"):
                nnunet_trainer_name(method)
        elif alias in NNUNET_NETWORK:
            assert nnunet_trainer_name(method) == "nnUNetTrainer", alias
        else:
            assert (alias, nnunet_trainer_name(method)) == ("nnunet_dropout", "nnUNetTrainerDropout")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def two_seeds(nnunet_run, tmp_path) -> TrainedRun:
    """nnunet_run's results copied, with a second run of loco fold 0 (seed 7: the same files, its record's seed)."""
    results = tmp_path / "results"
    shutil.copytree(nnunet_run.results, results)
    run = TrainedRun(nnunet_run.data_dir, results, results / nnunet_run.folder.relative_to(nnunet_run.results))
    other = run.folder.with_name("loco_fold0_seed7")
    shutil.copytree(run.folder, other, ignore=shutil.ignore_patterns("predictions"))
    record = json.loads((other / "calibnet_run.json").read_text())
    record["spec"]["seed"] = 7
    (other / "calibnet_run.json").write_text(json.dumps(record))
    run.activate()
    return run


@pytest.mark.slow
def test_fold_folder_holds_one_run_and_another_is_refused_unless_overwrite(two_seeds, tmp_path):
    trainer_folder = two_seeds.folder.parent
    fold_folder = trainer_folder / "fold_0"
    output = run_cli(export_cli.main, [TINY_ID, "3d_fullres", "nnunet", 0]).output
    assert f"to {fold_folder}" in output and "plain nnU-Net opens it" in output
    checkpoint = load_checkpoint(fold_folder / "checkpoint_final.pth")
    assert set(checkpoint) == set(INFERENCE_KEYS) and checkpoint["trainer_name"] == "nnUNetTrainer"  # no optimizer
    record = json.loads((fold_folder / "calibnet_export.json").read_text())
    assert record["spec"]["seed"] == 42 and record["trainer"] == "nnUNetTrainerCalib"
    assert record["run"] == str(two_seeds.folder)
    assert record["sha256"] == _sha256(two_seeds.folder / "checkpoint_final.pth")
    before = _sha256(fold_folder / "checkpoint_final.pth")

    result = run_cli(export_cli.main, [TINY_ID, "3d_fullres", "nnunet", 0, "--seed", 7], expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {fold_folder} holds nnunet loco fold 0 seed 42 ({two_seeds.folder}); pass --overwrite" \
        in result.output
    assert _sha256(fold_folder / "checkpoint_final.pth") == before
    output = run_cli(export_cli.main, [TINY_ID, "3d_fullres", "nnunet", 0, "--seed", 7, "--overwrite"]).output
    assert f"replaced nnunet loco fold 0 seed 42 ({two_seeds.folder})" in output
    assert json.loads((fold_folder / "calibnet_export.json").read_text())["spec"]["seed"] == 7
    run_cli(export_cli.main, [TINY_ID, "3d_fullres", "nnunet", 0, "--seed", 7])  # its own export: brought up to date
    assert not [p.name for p in trainer_folder.iterdir() if p.name.startswith(".fold_0")]  # no partial folder left

    (fold_folder / "calibnet_export.json").unlink()  # as a fold nnU-Net's own training wrote
    result = run_cli(export_cli.main, [TINY_ID, "3d_fullres", "nnunet", 0], expect_ok=False)
    assert "holds a model calib_export did not write" in result.output

    model = tmp_path / "model"
    model.mkdir()
    (model / "plans.json").write_text(json.dumps({"plans_name": "other"}))
    result = run_cli(export_cli.main, [TINY_ID, "3d_fullres", "nnunet", 0, "-o", model], expect_ok=False)
    assert f"Error: {model / 'plans.json'} is not this run's plans.json" in result.output
    assert sorted(p.name for p in model.iterdir()) == ["plans.json"]

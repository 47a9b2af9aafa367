"""calib_predict as nnUNetv2_predict: several folds ensembled (-f 0 1, -f all), -d as an id, folder name or name,
and nnU-Net's spellings (-chk, -device, -tr, ...) mapped or refused before anything is written."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calibnet import api
from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import predict as predict_cli
from calibnet.errors import CalibnetError
from calibnet.paths import dataset_id_of, data_roots_in_use
from conftest import TINY_ID, TINY_NAME, TrainedRun, run_cli, train_tiny_nnunet

CASE = "C4_000"


@pytest.fixture(scope="module")
def two_folds(nnunet_run, tmp_path_factory) -> TrainedRun:
    """nnunet_run's results copied, plus nnunet trained on loco fold 1 beside its fold 0 (same tiny settings)."""
    results = tmp_path_factory.mktemp("two_folds") / "results"
    shutil.copytree(nnunet_run.results, results)
    run = TrainedRun(nnunet_run.data_dir, results, results / nnunet_run.folder.relative_to(nnunet_run.results))
    train_tiny_nnunet(run, 1)
    return run


@pytest.fixture
def incoming(tiny_dataset, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for channel in (0, 1):
        shutil.copy(tiny_dataset.raw / "imagesTr" / f"{CASE}_{channel:04d}.nii.gz", folder)
    return folder


def _predict(run, incoming, out, *args, expect_ok=True):
    run.activate()
    return run_cli(predict_cli.main, ["-m", "nnunet", "-i", incoming, "-o", out, "--device", "cpu", "--disable-tta",
                                      *args], expect_ok=expect_ok)


def _probabilities(folder):
    return np.load(folder / f"{CASE}.npz")["probabilities"].astype(np.float64)


@pytest.mark.slow
def test_folds_are_ensembled_as_nnunet_does_and_all_finds_every_finished_fold(two_folds, incoming, tmp_path):
    for fold in (0, 1):
        _predict(two_folds, incoming, tmp_path / f"fold{fold}", "-d", TINY_ID, "-f", fold)
    output = _predict(two_folds, incoming, tmp_path / "ensemble", "-d", TINY_ID, "-f", 0, 1).output
    p0, p1, ensemble = (_probabilities(tmp_path / name) for name in ("fold0", "fold1", "ensemble"))
    assert np.abs(p0 - p1).max() > 1e-3  # two different models, else the check below proves nothing
    # nnU-Net's predictor averages the folds' logits: softmax(mean logits) = the normalised geometric mean of the
    # folds' probabilities (log p = logits minus a per-voxel constant), up to the float16 in which nnU-Net
    # accumulates logits
    with np.errstate(divide="ignore"):
        geometric = np.exp((np.log(p0) + np.log(p1)) / 2)
    geometric /= geometric.sum(0, keepdims=True)
    assert np.allclose(ensemble, geometric, atol=1e-3)
    # and in memory: the ensemble's logits are the mean of the folds' own, as nnU-Net computes it (in float16)
    from calibnet.inference.cases import folder_case_inputs, prepare_case
    from calibnet.inference.model_loading import load_fold_ensemble, load_model

    folders = {fold: two_folds.folder.parent / f"loco_fold{fold}_seed42" for fold in (0, 1)}
    single = [load_model(folders[fold], "cpu", use_mirroring=False) for fold in (0, 1)]
    case = prepare_case(single[0], folder_case_inputs(incoming, single[0].dataset_json)[0], 0)
    logits = [model.predict_logits(case) for model in single]
    ensembled = load_fold_ensemble(folders, "cpu", use_mirroring=False).predict_logits(case)
    assert ensembled.dtype == torch.float16 and torch.equal(ensembled, (logits[0] + logits[1]) / 2)
    assert not np.allclose(ensemble, p0, atol=1e-4) and not np.allclose(ensemble, p1, atol=1e-4)
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ensemble" / f"{CASE}.nii.gz")))
    assert np.array_equal(segmentation, ensemble.argmax(0))
    confidence = json.loads((tmp_path / "ensemble" / "confidence.json").read_text())[CASE]
    assert confidence["ensembled_folds"] == [0, 1]
    foreground = ensemble.argmax(0) > 0
    assert confidence["mean_max_probability_foreground"] == pytest.approx(
        ensemble.max(0)[foreground if foreground.any() else slice(None)].mean(), abs=1e-5)
    assert "with nnunet folds 0, 1 ensembled (mean of their logits" in output
    assert "ensembled_folds" not in json.loads((tmp_path / "fold0" / "confidence.json").read_text())[CASE]

    # -f all: the folds with a finished run (0 and 1), the same ensemble; -d as the folder name
    _predict(two_folds, incoming, tmp_path / "all", "-d", f"Dataset{TINY_ID}_{TINY_NAME}", "-f", "all")
    assert np.array_equal(_probabilities(tmp_path / "all"), ensemble)


@pytest.mark.slow
def test_a_fold_without_a_run_and_scores_of_one_network_are_refused_before_writing(two_folds, incoming, tmp_path):
    out = tmp_path / "out"
    result = _predict(two_folds, incoming, out, "-d", TINY_ID, "-f", 0, 2, expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: fold 2 of nnunet (3d_fullres, loco, seed 42) has no finished run: " in result.output
    assert "train it with: calib_train 511 3d_fullres nnunet 2 --split loco" in result.output
    for flag in (["--confidence"], ["--mc-samples", 2]):
        result = _predict(two_folds, incoming, out, "-d", TINY_ID, "-f", 0, 1, *flag, expect_ok=False)
        assert result.exit_code == 1 and f"Error: {flag[0]} scores one network, and -f 0 1 ensembles 2" in result.output
    assert not out.exists()
    two_folds.activate()
    with pytest.raises(CalibnetError, match="-f all: nnunet \\(3d_fullres, loco, seed 7\\) has no finished run"):
        api.predict(api.PredictRequest(TINY_ID, "nnunet", "all", incoming, out, seed=7, device="cpu"))
    assert not out.exists()


@pytest.fixture
def requests(monkeypatch):
    """The PredictRequest each calib_predict call makes (nothing is predicted)."""
    made = []
    monkeypatch.setattr(api, "predict", lambda request, roots: made.append(request) or
                        api.PredictResult(request.method, request.output_dir, request.output_dir, {}, {}, []))
    return made


@pytest.fixture
def synth_brain(tmp_path):
    """An empty data root holding raw/Dataset501_SynthBrain and an input folder."""
    (tmp_path / "data" / "raw" / "Dataset501_SynthBrain").mkdir(parents=True)
    (tmp_path / "in").mkdir()
    import os
    os.environ["CALIBNET_DATA"] = str(tmp_path / "data")
    return tmp_path


def _cli(tmp_path, *args, expect_ok=True):
    return run_cli(predict_cli.main, ["-m", "nnunet", "-i", tmp_path / "in", "-o", tmp_path / "out", *args],
                   expect_ok=expect_ok)


def test_nnunet_spellings_are_mapped_to_calibnets_options(synth_brain, requests):
    result = _cli(synth_brain, "-d", "Dataset501_SynthBrain", "-f", 0, 1, "-f", 3, "-chk", "checkpoint_best.pth",
                  "-device", "cpu", "-step_size", 0.25, "--disable_tta")
    (request,) = requests
    assert request.dataset_id == 501 and request.fold == (0, 1, 3)
    assert request.checkpoint == "checkpoint_best.pth" and request.configuration == "3d_fullres"  # not -c hk
    assert request.device == "cpu" and request.step_size == 0.25 and not request.use_mirroring
    assert "note: -chk read as --checkpoint" in result.output
    _cli(synth_brain, "-d", "SynthBrain", "-f", "all", "-chk=checkpoint_latest.pth")
    assert requests[1].dataset_id == 501 and requests[1].fold == "all"
    assert requests[1].checkpoint == "checkpoint_latest.pth"


@pytest.mark.parametrize("args, message", [
    (["-tr", "nnUNetTrainer"], "Error: calibnet has no -tr: name the method (calib_train --list)."),
    (["-p", "nnUNetPlans"], "Error: calibnet has no -p: every calibnet run uses the plans CalibPlans"),
    (["-npp", 3], "Error: calibnet has no -npp: calib_predict preprocesses each case in its own process."),
    (["-chkpt", "x"], "Error: calibnet has no -chkpt in"),
    (["-devic", "cpu"], "calibnet spells it --device"),
    (["--save_probabilitie"], "calibnet spells it --save-probabilities"),
    (["-f", "all"], "give fold numbers or all, not both."),
    (["-d", "Dataset501_Other"], "Dataset501_Other does not match the dataset's folder: dataset 501 is "
                                 "Dataset501_SynthBrain in the data roots; give 501 or Dataset501_SynthBrain."),
    (["-d", "Other"], "no dataset is named Other; give an id (501), a folder name"),
])
def test_nnunet_spellings_without_an_equivalent_are_refused_and_nothing_is_written(synth_brain, requests, args,
                                                                                    message):
    result = _cli(synth_brain, "-d", 501, "-f", 0, *args, expect_ok=False)  # a later -d wins, as in click
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not requests and not (synth_brain / "out").exists()


def test_dataset_is_an_id_a_folder_name_or_a_name_in_every_command(synth_brain, tiny_dataset):
    roots = data_roots_in_use()
    assert [dataset_id_of(v, roots) for v in ("501", "Dataset501_SynthBrain", "SynthBrain", "602")] == [501] * 3 + [602]
    (synth_brain / "data" / "results" / "Dataset502_SynthBrain").mkdir(parents=True)
    with pytest.raises(CalibnetError, match="several datasets are named SynthBrain"):
        dataset_id_of("SynthBrain", data_roots_in_use())
    result = run_cli(evaluate_cli.main, ["--split", "loco", "-d", "Dataset501_Brain"], expect_ok=False)
    assert result.exit_code == 2 and "dataset 501 is Dataset501_SynthBrain" in result.output
    tiny_dataset.activate()
    # resolved by its name (a name that does not resolve is a usage error, status 2); fold 97 does not exist, so the
    # refusal names the dataset and nothing is evaluated, whatever runs other tests left in the shared dataset
    result = run_cli(evaluate_cli.main, ["--split", "loco", "-d", TINY_NAME, "--folds", "97"], expect_ok=False)
    assert result.exit_code == 1 and (f"Dataset{TINY_ID}_{TINY_NAME}" in result.output
                                      or f"dataset {TINY_ID}" in result.output), result.output

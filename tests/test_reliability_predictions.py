"""Incomplete predictions (issue 17, item 4): a killed prediction leaves no role folder that looks complete,
calib_evaluate names an incomplete run with the command that completes it and evaluates the others, a case or a
score missing from confidence.json is reported, and re-scoring one confidence head keeps the others' scores.

One nnunet run (scanner fold 0, seed 5) is trained once into a results tree of this module; each test works on
its own copy."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from calibnet.cli import evaluate as evaluate_cli
from calibnet.cli import train as train_cli
from calibnet.inference import predict as predict_module
from calibnet.runs import prediction_folder, prediction_set_complete
from conftest import _EnvSnapshot, run_cli

pytestmark = pytest.mark.slow
RUN = Path("Dataset511_Tiny") / "nnUNetTrainerCalib__CalibPlans__3d_fullres" / "scanner_fold0_seed5"
COMMAND = "calib_train 511 3d_fullres nnunet 0 --split scanner --seed {seed} --predict-only"


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """A results tree holding the one trained run (never changed: tests copy it)."""
    results = tmp_path_factory.mktemp("reliability_results")
    snapshot = _EnvSnapshot()
    os.environ.update({"nnUNet_raw": str(tiny_dataset.data_dir / "raw"),
                       "nnUNet_preprocessed": str(tiny_dataset.data_dir / "preprocessed"),
                       "nnUNet_results": str(results)})
    try:
        run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 0, "--split", "scanner", "--seed", 5, "--epochs", 1,
                                 "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--num-workers", 0])
    finally:
        snapshot.restore()
    return results


def _copy(trained: Path, results: Path, seeds=(5,)) -> dict:
    """Copies of the trained run under ``results`` as seeds ``seeds``; {seed: folder}."""
    folders = {}
    (results / RUN.parent).mkdir(parents=True)
    for path in (trained / RUN.parent).iterdir():  # the trainer folder's plans.json and dataset.json
        if path.is_file():
            shutil.copy2(path, results / RUN.parent / path.name)
    for seed in seeds:
        folder = results / RUN.parent / f"scanner_fold0_seed{seed}"
        shutil.copytree(trained / RUN, folder)
        record = json.loads((folder / "calibnet_run.json").read_text())
        record["spec"]["seed"] = seed
        (folder / "calibnet_run.json").write_text(json.dumps(record))
        folders[seed] = folder
    return folders


def _evaluate(expect_ok=True):
    return run_cli(evaluate_cli.main, ["--split", "scanner"], expect_ok=expect_ok)


def test_incomplete_runs_are_named_with_their_command_and_the_rest_is_evaluated(trained, results):
    runs = _copy(trained, results, seeds=(5, 6, 7, 8))
    test5 = prediction_folder(runs[5], "test")
    lost_npz = sorted(test5.glob("*.npz"))[0]
    lost_npz.unlink()  # killed while predicting (calibnet before role folders were written whole)
    lost_segmentation = sorted(test5.glob("*.nii.gz"))[-1]
    lost_segmentation.unlink()
    val6 = prediction_folder(runs[6], "val") / "confidence.json"
    confidence = json.loads(val6.read_text())
    dropped_case = sorted(confidence)[0]
    del confidence[dropped_case]  # a case missing from confidence.json
    val6.write_text(json.dumps(confidence))
    test7 = prediction_folder(runs[7], "test") / "confidence.json"
    confidence = json.loads(test7.read_text())
    no_score = sorted(confidence)[0]
    del confidence[no_score]["entropy_foreground"]  # one score missing for one case
    test7.write_text(json.dumps(confidence))

    output = _evaluate().output
    assert "Traceback" not in output
    assert (f"missing: nnunet 3d_fullres scanner fold 0 seed 5: incomplete predictions: "
            f"test {lost_npz.name[:-len('.npz')]} (probabilities)") in output, output
    assert f"test {lost_segmentation.name[:-len('.nii.gz')]} (segmentation)" in output
    assert f"not evaluated; complete them with: {COMMAND.format(seed=5)})" in output
    assert f"seed 6: incomplete predictions: val {dropped_case} (confidence.json entry)" in output
    assert COMMAND.format(seed=6) in output
    assert (f"nnunet fold 0 seed 7: confidence score entropy_foreground is missing for {no_score} (1 of ") in output
    per_case = pd.read_csv(results / "Dataset511_Tiny" / "evaluation" / "scanner" / "per_case.csv")
    assert sorted(per_case["seed"].unique()) == [7, 8]
    summary = json.loads((results / "Dataset511_Tiny" / "evaluation" / "scanner" / "summary.json").read_text())
    assert sum("incomplete predictions" in m for m in summary["missing"]) == 2


def test_killed_prediction_leaves_no_role_folder_that_looks_complete(trained, results, monkeypatch):
    run = _copy(trained, results)[5]
    real = predict_module.predict_cases

    def killed_in_test(model, cases, folder, **kwargs):
        if Path(folder).name.startswith(".test."):
            real(model, cases[:1], folder, **kwargs)  # one test case written, then the process is stopped
            raise KeyboardInterrupt
        return real(model, cases, folder, **kwargs)

    monkeypatch.setattr(predict_module, "predict_cases", killed_in_test)
    raw, preprocessed = Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])
    with pytest.raises(KeyboardInterrupt):
        predict_module.predict_run_splits(run, raw, preprocessed, use_mirroring=False, progress=False)
    assert not prediction_folder(run, "test").exists() and prediction_folder(run, "val").is_dir()
    assert not prediction_set_complete(run)
    result = _evaluate(expect_ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"seed 5: no test predictions (not evaluated; complete them with: {COMMAND.format(seed=5)})" \
        in result.output

    stale = run / "predictions" / ".test.k3x9_a7q.partial"  # what SIGKILL leaves: the temporary folder
    stale.mkdir()
    (stale / "C2_000.npz").write_bytes(b"half")
    monkeypatch.setattr(predict_module, "predict_cases", real)
    predict_module.predict_run_splits(run, raw, preprocessed, use_mirroring=False, progress=False)
    assert prediction_set_complete(run) and not stale.exists()
    assert sorted(p.name for p in (run / "predictions").iterdir()) == ["test", "val"]
    fold_cases = json.loads((prediction_folder(trained / RUN, "test") / "confidence.json").read_text())
    assert sorted(json.loads((prediction_folder(run, "test") / "confidence.json").read_text())) == sorted(fold_cases)


def test_rescoring_one_head_keeps_the_other_heads_scores(tmp_path, monkeypatch):
    """Each head's scoring pass replaces the scores of the heads it scored only, in confidence.json as it is when
    the pass ends (another head's pass may have written meanwhile)."""
    path = tmp_path / "confidence.json"
    path.write_text(json.dumps({"A": {"mean_max_probability_foreground": 0.9, "adversarial_head_predicted_dice": 0.5,
                                      "plain_head_predicted_dice": 0.1}}))

    def scores(model, logits):
        other = json.loads(path.read_text())  # meanwhile, the adversarial head's own pass writes its scores
        other["A"].update(adversarial_head_predicted_dice=0.6, adversarial_head_predicted_nsd=0.4)
        path.write_text(json.dumps(other))
        return {"plain_head_predicted_dice": 0.7}

    monkeypatch.setattr(predict_module, "prepare_case", lambda model, case, seed: case)
    monkeypatch.setattr(predict_module, "head_scores", scores)
    model = SimpleNamespace(heads=[SimpleNamespace(prefix="plain_head")], predict_logits=lambda case: None)
    predict_module.score_existing_predictions(model, [SimpleNamespace(case_id="A")], tmp_path, progress=False)
    assert json.loads(path.read_text()) == {"A": {"mean_max_probability_foreground": 0.9,
                                                  "adversarial_head_predicted_dice": 0.6,
                                                  "adversarial_head_predicted_nsd": 0.4,
                                                  "plain_head_predicted_dice": 0.7}}

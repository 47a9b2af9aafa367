"""calib_train --sam-prompt points|box: the per-slice prompts a SAM-FT method trains and predicts with, recorded in
calibnet_run.json and followed when the run is loaded and evaluated (tiny SAM on the tiny dataset, CPU)."""
import json

import numpy as np
import pandas as pd
import pytest

from calibnet.cli import train as train_cli
from calibnet.errors import CalibnetError
from calibnet.launch.options import BackboneOptions, check_backbone_options
from calibnet.methods import METHODS, get_method
from conftest import run_cli

SHORT = ["--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--sam-model", "tiny"]
SAM_FT = ("samft", "samft_focal", "samft_dicepp", "calsam", "sam_fip", "sam_cmp", "medsam")


def test_the_sam_ft_family_chooses_its_prompts_and_others_refuse_the_flag():
    assert tuple(m.alias for m in METHODS.values() if m.chooses_sam_prompt) == SAM_FT
    for alias in SAM_FT:
        method = get_method(alias)
        assert method.own_prompts == "default" and method.own_prompts_of({"sam_prompt": "box"}) == "B100"
        assert method.own_prompts_of({"sam_prompt": None}) == "default"  # a record without a choice: the method's
    for alias in ("vanilla_sam", "medsam_u"):  # boxes always: box is accepted (nothing changes), points refused
        check_backbone_options(get_method(alias), BackboneOptions(sam_prompt="box"))
        with pytest.raises(CalibnetError, match=f"--sam-prompt points does not apply to {alias} .*ground-truth box"):
            check_backbone_options(get_method(alias), BackboneOptions(sam_prompt="points"))
    for alias in ("safeclick", "sam2ft", "samft_imperfect", "safeclick_lite", "sam2_zeroshot"):
        with pytest.raises(CalibnetError, match=f"--sam-prompt box does not apply to {alias} .*keep their own"):
            check_backbone_options(get_method(alias), BackboneOptions(sam_prompt="box"))


def test_experiment_files_pass_sam_prompt_through_calib_train_s_parser(tiny_dataset):
    from calibnet.cli.experiment import train_parser
    from calibnet.launch.request_checks import check_request

    parser = train_parser()
    assert "sam-prompt" in parser.flags and not parser.flags["sam-prompt"].is_flag
    request = parser.parse(["511", "3d_fullres", "samft", "0", "--sam-prompt", "box"])
    assert request.backbone.sam_prompt == "box"
    assert check_request(request, tiny_dataset.preprocessed.parent) == "samft"
    with pytest.raises(CalibnetError, match="--sam-prompt box does not apply to nnunet"):
        check_request(parser.parse(["511", "3d_fullres", "nnunet", "0", "--sam-prompt", "box"]),
                      tiny_dataset.preprocessed.parent)


@pytest.mark.parametrize("args, message", [
    (["nnunet", 0, "--sam-prompt", "box"], "--sam-prompt box does not apply to nnunet (it takes no SAM prompts)"),
    (["vanilla_sam", 0, "--sam-prompt", "points"], "--sam-prompt points does not apply to vanilla_sam"),
    (["samft", 0, "--sam-prompt", "circle"], "Invalid value for '--sam-prompt'"),
])
def test_calib_train_refuses_sam_prompt_where_it_does_not_apply(results, args, message):
    result = run_cli(train_cli.main, [511, "3d_fullres", *args, *SHORT], expect_ok=False)
    assert result.exit_code != 0 and message in result.output
    assert not results.exists() or not any(results.rglob("calibnet_run.json"))


@pytest.mark.slow
def test_samft_trains_and_predicts_with_boxes_and_is_evaluated_as_b100(results, tiny_dataset, monkeypatch):
    from calibnet.cli import evaluate as evaluate_cli
    from calibnet.evaluation.evaluate import _prediction_sets, _Collected
    from calibnet.inference.model_loading import _build_network, load_model
    from calibnet.runs import Run
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFT

    seen = []  # (network decodes boxes, prompts) of every training and validation batch
    original = nnUNetTrainerSAMFT.slice_prompts

    def spy(self, keys):
        prompts = original(self, keys)
        seen.append((self.network.use_box, prompts))
        return prompts

    monkeypatch.setattr(nnUNetTrainerSAMFT, "slice_prompts", spy)
    output = run_cli(train_cli.main, [511, "3d_fullres", "samft", 2, "--sam-prompt", "box", *SHORT]).output
    assert "SAM prompts: box per slice (--sam-prompt)" in output and "trained samft" in output
    assert seen and all(use_box and all(set(p) == {"box"} for p in prompts) for use_box, prompts in seen)

    folder = results / "Dataset511_Tiny" / "nnUNetTrainerSAMFT__CalibPlans__3d_fullres" / "loco_fold2_seed42"
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["sam_prompt"] == "box"

    model = load_model(folder, "cpu")  # what --predict-only and calib_predict load
    assert model.network.use_box is True
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[0, 2:5, 3:6] = True
    channels = model.prompt_inputs(mask, np.random.default_rng(0)).numpy()
    assert channels[:2].sum() == 0 and channels[2, 0].sum() == 9 and channels[2, 1].sum() == 0  # the box only
    for older in ({k: v for k, v in record.items() if k != "sam_prompt"}, {**record, "sam_prompt": None}):
        assert _build_network(nnUNetTrainerSAMFT, older, None, None, {}, None).use_box is False  # the class's

    # --continue and --predict-only keep the recorded prompts
    result = run_cli(train_cli.main, [511, "3d_fullres", "samft", 2, "--continue", *SHORT], expect_ok=False)
    assert result.exit_code == 1 and "give --sam-prompt box" in result.output
    result = run_cli(train_cli.main, [511, "3d_fullres", "samft", 2, "--predict-only", "--device", "cpu",
                                      "--sam-prompt", "points"], expect_ok=False)
    assert result.exit_code == 1 and "--predict-only keeps the prompts the run was trained with" in result.output

    # the run has no prompt-quality sets, so the dataset and fold are not read
    assert _prediction_sets(None, Run(folder, record), None, "samft", _Collected()) == [(None, "samft", "B100")]
    run_cli(evaluate_cli.main, ["--split", "loco", "--methods", "samft", "--folds", 2])
    per_case = pd.read_csv(results / "Dataset511_Tiny" / "evaluation" / "loco" / "per_case.csv")
    plain = per_case[~per_case["method"].str.contains(r" \+ ")]
    assert set(plain["method"]) == {"samft"} and set(plain["prompts"]) == {"B100"}  # as vanilla_sam's own


def test_runs_of_one_method_with_other_prompts_get_rows_of_their_own(tmp_path):
    from calibnet.runs import Run, run_labels

    def run(name, **extra):
        return Run(tmp_path / name, {"spec": {"method": "samft", "configuration": "2d", "fold": 0, "seed": 42},
                                     "trainer": "nnUNetTrainerSAMFT", "backbone": {"model": "tiny"},
                                     "loss_options": {}, "network_options": {}, **extra})

    labels = run_labels([run("a"), run("b", sam_prompt=None), run("c", sam_prompt="box")])
    assert labels[tmp_path / "a"] == labels[tmp_path / "b"] == "samft (sam prompt=points)"
    assert labels[tmp_path / "c"] == "samft (sam prompt=box)"
    assert run_labels([run("a"), run("b", sam_prompt=None)])[tmp_path / "a"] == "samft"  # older records: as before

"""The method registry is declared data that agrees with the trainer classes; the option groups of a
calib_train request are checked against it with calib_train's messages; the CLI only maps flags onto
api.TrainRequest / api.PredictRequest (no dataset needed: the api call is replaced)."""
import inspect
import re

import pytest

from calibnet import api
from calibnet.errors import CalibnetError, UsageError
from calibnet.losses import FIP_ESTIMATORS
from calibnet.launch.options import (BackboneOptions, HeadOptions, LossOptions, NetworkOptions, PredictionOptions,
                                     TrainRequest, check_backbone_options, check_head_options, check_loss_options,
                                     check_network_options, check_prediction_options)
from calibnet.methods import LOSS_FLAGS, METHODS, Method, get_method, safeclick_variant
from conftest import run_cli


@pytest.mark.parametrize("alias", list(METHODS))
def test_declared_fields_agree_with_the_trainer_class(alias):
    from calibnet.trainers.nnUNetTrainerConfidenceHead import nnUNetTrainerConfidenceHead
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFT
    from calibnet.trainers.nnUNetTrainerSAM2 import nnUNetTrainerSAM2FT

    method = METHODS[alias]
    trainer = method.trainer_class()
    assert trainer.__name__ == method.class_name
    family = "sam2" if issubclass(trainer, nnUNetTrainerSAM2FT) else "sam" if issubclass(trainer, nnUNetTrainerSAMFT) \
        else "none"
    assert method.backbone == family
    assert method.trains_head == issubclass(trainer, nnUNetTrainerConfidenceHead)
    assert method.box_prompt == trainer.use_box
    for option in method.loss_options:  # each loss flag sets an attribute the trainer declares: a float or a name
        if option == "fip_estimator":
            assert getattr(trainer, option) in FIP_ESTIMATORS, alias
        else:
            assert isinstance(getattr(trainer, option), float), (alias, option)


def test_medsam_u_network_options_are_arguments_of_its_network():
    from calibnet.networks.medsam_u import MedSAMUSegmenter

    parameters = inspect.signature(MedSAMUSegmenter.__init__).parameters
    assert METHODS["medsam_u"].network_options and all(o in parameters for o in METHODS["medsam_u"].network_options)
    assert [m.alias for m in METHODS.values() if m.network_options] == ["medsam_u"]


def test_undeclared_options_are_refused_when_the_registry_is_built():
    with pytest.raises(ValueError, match="undeclared"):
        Method("x", "m", "C", "s", loss_options=("lambda_xyz",))
    with pytest.raises(ValueError, match="undeclared"):
        Method("x", "m", "C", "s", backbone="sam3")


def test_safeclick_ablations_come_from_the_declared_parts():
    assert safeclick_variant("safeclick", ["e2"]) == "safeclick_no_e2"
    assert safeclick_variant("nnunet", []) == "nnunet"
    with pytest.raises(CalibnetError, match="--no-e1 ablate parts of safeclick, not calsam"):
        safeclick_variant("calsam", ["e1"])
    with pytest.raises(CalibnetError, match="one ablation at a time"):
        safeclick_variant("safeclick", ["e1", "crl"])


@pytest.mark.parametrize("method, options, message", [
    ("nnunet", LossOptions(lambda_fip=1), "--lambda-fip does not apply to method nnunet; it takes no loss flags"),
    ("sam_fip", LossOptions(lambda_cmp=1), "--lambda-cmp does not apply to method sam_fip; it takes --lambda-fip, --fip-estimator."),
    ("calunet", LossOptions(cmp_gamma=0), "--cmp-gamma 0.0 is out of range: give a finite value > 0"),
    ("focal", LossOptions(focal_gamma=-1), "--focal-gamma -1.0 is out of range: give a finite value >= 0"),
])
def test_loss_flags_are_checked_against_the_method(method, options, message):
    with pytest.raises(CalibnetError, match=re.escape(message)):
        check_loss_options(get_method(method), options)


def test_accepted_loss_flags_come_back_as_floats():
    assert check_loss_options(get_method("calsam"), LossOptions(lambda_fip=1, cmp_tau=0)) == \
        {"lambda_fip": 1.0, "cmp_tau": 0.0}
    assert check_loss_options(get_method("focal"), LossOptions(focal_gamma=0)) == {"focal_gamma": 0.0}
    assert set(LOSS_FLAGS) == {f for m in METHODS.values() for f in m.loss_options}


@pytest.mark.parametrize("method, options, message", [
    ("nnunet", BackboneOptions(target_label=1), "--sam-model, --sam-checkpoint, --sam2-* and --target apply to SAM "
                                                "methods, not nnunet."),
    ("safeclick", BackboneOptions(sam_model="tiny"), "safeclick runs on SAM 2: use --sam2-model/--sam2-checkpoint"),
    ("calsam", BackboneOptions(sam2_image_size=128), "--sam2-model, --sam2-checkpoint and --sam2-image-size apply to "
                                                     "SAM 2 methods (sam2_zeroshot, sam2ft, safeclick), not calsam."),
])
def test_backbone_flags_of_another_family_are_refused(method, options, message):
    with pytest.raises(CalibnetError, match=re.escape(message)):
        check_backbone_options(get_method(method), options)


def test_backbone_flags_of_the_family_and_the_target_are_accepted():
    check_backbone_options(get_method("calsam"), BackboneOptions(sam_model="tiny", target_label=1))
    check_backbone_options(get_method("sam2ft"), BackboneOptions(sam2_model="hiera_t", sam2_image_size=128,
                                                                 target_label=0))
    check_backbone_options(get_method("nnunet"), BackboneOptions())


def test_network_and_head_and_prediction_flags():
    with pytest.raises(CalibnetError, match="^--ugmp-boxes, --no-ugpa apply to medsam_u, not samft.$"):
        check_network_options(get_method("samft"), NetworkOptions(n_boxes=5, ugpa=False))
    assert check_network_options(get_method("medsam_u"), NetworkOptions(sigma=2.0)) == {"sigma": 2.0}
    with pytest.raises(UsageError, match="confidence_head needs --base METHOD"):
        check_head_options(get_method("confidence_head"), HeadOptions())
    with pytest.raises(UsageError, match="apply to confidence_head"):
        check_head_options(get_method("nnunet"), HeadOptions(adversarial=False))
    check_head_options(get_method("nnunet"), HeadOptions())
    request = TrainRequest(511, "3d_fullres", "medsam_u", 0, network=NetworkOptions(ugpa=False),
                           prediction=PredictionOptions(predict_only=True))
    with pytest.raises(UsageError, match="needs --prompts SETTING"):
        check_prediction_options(request)


def test_calib_train_maps_every_flag_onto_the_request(monkeypatch, tmp_path):
    from calibnet.cli import train as train_cli

    monkeypatch.setenv("CALIBNET_DATA", str(tmp_path))
    requests = []
    monkeypatch.setattr(api, "train", lambda request, roots, log: requests.append(request))
    run_cli(train_cli.main, [511, "2d", "safeclick", 3, "--split", "scanner", "--seed", 7, "--epochs", 2,
                             "--iters-per-epoch", 5, "--device", "cpu", "--num-workers", 0, "--continue",
                             "--predict-only", "--disable-tta", "--mc-samples", 15, "--mc-samples", 2,
                             "--lambda-fip", 0.1, "--fip-estimator", "exact", "--lambda-cmp", 0.2, "--cmp-tau", 0.3, "--cmp-gamma", 0.4,
                             "--focal-gamma", 0.5, "--dicepp-gamma", 0.6, "--sam-model", "tiny", "--sam-checkpoint", "a",
                             "--sam2-model", "hiera_s", "--sam2-checkpoint", "b", "--sam2-image-size", 128,
                             "--no-e2", "--target", 1, "--sam-prompt", "box", "--adapter-blocks", "0,3",
                             "--adapter-ratio", 0.5,
                             "--ugmp-boxes", 4, "--ugmp-sigma", 2, "--ugpa-k", 3, "--ugpa-compare", "roi", "--no-ugpa",
                             "--prompts", "P50", "--prompts", "3B0.5", "--base", "nnunet", "--no-adversarial",
                             "--warmup-batches", 9, "--patience", 8])
    assert requests == [TrainRequest(
        511, "2d", "safeclick", 3, "scanner", 7, epochs=2, iterations_per_epoch=5, device="cpu", num_workers=0,
        continue_training=True, ablations=("e2",),
        loss=LossOptions(0.1, "exact", 0.2, 0.3, 0.4, 0.5, 0.6),
        backbone=BackboneOptions("tiny", "a", "hiera_s", "b", 128, 1, "box"),
        network=NetworkOptions("0,3", 0.5, 4, 2.0, 3, "roi", False),
        head=HeadOptions("nnunet", False, 9, 8),
        prediction=PredictionOptions(False, (15, 2), ("P50", "3B0.5"), True))]
    run_cli(train_cli.main, [501, "3d_fullres", "nnunet", 0])
    assert requests[-1] == TrainRequest(501, "3d_fullres", "nnunet", 0)


def test_calib_predict_maps_every_flag_onto_the_request(monkeypatch, tmp_path):
    from calibnet.cli import predict as predict_cli

    monkeypatch.setenv("CALIBNET_DATA", str(tmp_path))
    requests = []
    monkeypatch.setattr(api, "predict", lambda request, roots: requests.append(request) or
                        api.PredictResult("m", tmp_path, tmp_path, {}, {}, ["line one", "warning: two"]))
    output = run_cli(predict_cli.main, ["-d", 511, "-m", "calsam", "-f", 1, "-c", "2d", "--split", "scanner",
                                        "--seed", 3, "-i", tmp_path, "-o", tmp_path / "o", "--no-save-probabilities",
                                        "--disable-tta", "--mc-samples", 2, "--confidence", "--flag-below", 0.7,
                                        "--device", "cpu", "--prompts", "P50", "--prompts-from", tmp_path]).output
    assert output.endswith("line one\nwarning: two\n")
    assert requests == [api.PredictRequest(511, "calsam", (1,), tmp_path, tmp_path / "o", "2d", "scanner", 3, False,
                                           False, (2,), True, 0.7, "cpu", "P50", tmp_path)]


def test_usage_errors_keep_click_exit_status_2(monkeypatch, tmp_path):
    from calibnet.cli import train as train_cli

    monkeypatch.setenv("CALIBNET_DATA", str(tmp_path))
    result = run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 0, "--patience", 3], expect_ok=False)
    assert result.exit_code == 2 and "Usage:" in result.output
    assert "Error: --base, --no-adversarial, --warmup-batches and --patience apply to confidence_head." in result.output

"""calib_train and calib_predict end to end on the tiny dataset (32³, 1 epoch of 2 iterations, CPU)."""
import json
import math
import shlex
import shutil
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from calibnet.cli import export as export_cli
from calibnet.cli import predict as predict_cli
from calibnet.cli import train as train_cli
from calibnet.methods import METHODS
from conftest import run_cli

pytestmark = pytest.mark.slow
NNUNET_METHODS = [alias for alias, method in METHODS.items()  # SAM: test_sam_methods.py; heads: test_confidence_heads.py
                  if not method.uses_sam and not method.trains_head]
SHORT = ["--epochs", 1, "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--num-workers", 0]


def _results(tiny_dataset, trainer, split="loco", fold=0, seed=42):
    return (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / f"{trainer}__CalibPlans__3d_fullres"
            / f"{split}_fold{fold}_seed{seed}")


def _fold(tiny_dataset, split, fold):
    return json.loads((tiny_dataset.preprocessed / "calib_splits.json").read_text())[split]["folds"][fold]


class _TrainedRuns(dict):
    """{alias: (calib_train output, run folder)} of methods trained on loco fold 1 (holds out C2), each trained
    on first use, so that a test selected alone trains only the methods it reads."""

    def __init__(self, tiny_dataset):
        super().__init__()
        self.tiny_dataset = tiny_dataset

    def __missing__(self, alias):
        self.tiny_dataset.activate()
        output = run_cli(train_cli.main, [511, "3d_fullres", alias, 1, *SHORT]).output
        self[alias] = (output, _results(self.tiny_dataset, METHODS[alias].class_name, fold=1))
        return self[alias]


@pytest.fixture(scope="module")
def trained(tiny_dataset):
    """Methods trained on loco fold 1 (holds out C2), on demand: {alias: (output, run folder)}."""
    return _TrainedRuns(tiny_dataset)


@pytest.mark.parametrize("alias", NNUNET_METHODS)
def test_each_method_trains_and_predicts_exactly_the_folds_val_and_test_cases(tiny_dataset, trained, alias):
    output, folder = trained[alias]
    assert (folder / "checkpoint_final.pth").is_file()
    record = json.loads((folder / "calibnet_run.json").read_text())
    assert record["spec"]["method"] == alias and record["fold_description"] == "fold 1 holds out center C2"
    assert record["num_gpus"] == 1  # trained in this process, without DDP
    fold = _fold(tiny_dataset, "loco", 1)
    for role in ("val", "test"):
        predictions = folder / "predictions" / role
        assert f"{role} predictions: {predictions}" in output
        assert sorted(p.name[:-7] for p in predictions.glob("*.nii.gz")) == sorted(fold[role])
        confidence = json.loads((predictions / "confidence.json").read_text())
        assert sorted(confidence) == sorted(fold[role])
        for case_id in fold[role]:
            probabilities = np.load(predictions / f"{case_id}.npz")["probabilities"]
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(tiny_dataset.raw / "imagesTr" / f"{case_id}_0000.nii.gz")))
            # nnU-Net's own float32 file (float16 would round every p > 0.99976 to 1 and move calibration)
            assert probabilities.dtype == np.float32 and probabilities.shape == (2, *image.shape)
            np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
            segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case_id}.nii.gz")))
            p32 = probabilities  # the segmentation is the argmax of the stored probabilities (ties aside)
            decided = np.abs(p32[1] - p32[0]) > 1e-6
            assert np.array_equal(segmentation[decided], p32.argmax(0)[decided])
            # the image-level scores, recomputed by hand from the written files: over the predicted foreground
            # (the whole image where nothing is predicted), the mean of max_c p_c and of the entropy / log C
            foreground = segmentation > 0
            where = foreground if foreground.any() else np.ones_like(foreground)
            entropy = -(p32 * np.log(np.clip(p32, 1e-7, 1))).sum(0) / np.log(2)
            scores = confidence[case_id]
            assert scores["predicted_foreground_voxels"] == int(foreground.sum())
            assert scores["mean_max_probability_foreground"] == pytest.approx(p32.max(0)[where].mean(), abs=1e-6)
            assert scores["entropy_foreground"] == pytest.approx(entropy[where].mean(), abs=1e-6)
    assert not list(folder.parent.glob("fold_*")), "nnU-Net's default fold folder was left behind"


def test_loss_options_are_recorded_and_checked(tiny_dataset, trained):
    record = json.loads((trained["calunet"][1] / "calibnet_run.json").read_text())
    assert record["loss_options"].pop("fip_estimator") == "amortised"  # calunet's default
    assert record["loss_options"] == pytest.approx({"lambda_fip": 0.3, "lambda_cmp": 0.5, "cmp_tau": np.log(2),
                                                    "cmp_gamma": 0.1})
    tiny_dataset.activate()
    result = run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 0, "--lambda-fip", 1], expect_ok=False)
    assert result.exit_code == 1 and "--lambda-fip does not apply to method nnunet" in result.output
    result = run_cli(train_cli.main, [511, "3d_fullres", "calunet", 0, "--cmp-gamma", 0], expect_ok=False)
    assert result.exit_code == 1 and "--cmp-gamma 0.0 is out of range" in result.output


def _seconds(folder):
    return json.loads((folder / "calibnet_run.json").read_text())["seconds"]


def _set_seconds(folder, seconds):
    record = json.loads((folder / "calibnet_run.json").read_text())
    (folder / "calibnet_run.json").write_text(json.dumps({**record, "seconds": seconds}))


def test_the_record_holds_the_seconds_of_training_and_prediction(tiny_dataset, trained):
    output, folder = trained["nnunet"]
    seconds = _seconds(folder)
    assert set(seconds) == {"training", "prediction"}
    for step in ("training", "prediction"):
        assert isinstance(seconds[step], float) and math.isfinite(seconds[step]) and seconds[step] > 0, step
    assert f"trained nnunet: {folder} ({seconds['training']:.1f} s)" in output


def test_scanner_split_trains_on_one_vendor_and_continue_resumes(tiny_dataset):
    tiny_dataset.activate()
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 1, "--split", "scanner", *SHORT])
    folder = _results(tiny_dataset, "nnUNetTrainerCalib", "scanner", 1)
    assert _seconds(folder)["training"] > 0
    log = "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    listed = log.split("train cases: ")[1].splitlines()[0].strip().split(", ")
    domains = {line.split(",")[0]: line.split(",")[2] for line in (tiny_dataset.raw / "domains.csv").read_text().splitlines()[1:]}
    assert listed and {domains[c] for c in listed} == {"GE"}
    assert sorted(p.name[:-7] for p in (folder / "predictions" / "test").glob("*.nii.gz")) == \
        sorted(c for c, v in domains.items() if v != "GE")
    # --continue adds its training seconds to those recorded; entries of the previous model's outputs go
    _set_seconds(folder, {"training": 1000.0, "prediction": 2000.0, "prediction_prompts": {"3B0.5": 5.0}})
    start = time.perf_counter()
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 1, "--split", "scanner", "--continue", "--epochs", 2,
                             "--iters-per-epoch", 2, "--device", "cpu", "--disable-tta", "--num-workers", 0])
    elapsed = time.perf_counter() - start
    seconds = _seconds(folder)
    assert set(seconds) == {"training", "prediction"}
    assert 1000.0 < seconds["training"] and seconds["training"] - 1000.0 + seconds["prediction"] <= elapsed
    checkpoint = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 2
    log = "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    assert "Epoch 1" in log


def test_predict_only_redoes_the_predictions(tiny_dataset, trained):
    tiny_dataset.activate()
    folder = trained["nnunet"][1]
    stale = folder / "predictions" / "test" / "stale.nii.gz"
    stale.write_text("x")
    _set_seconds(folder, {"training": 123.25, "prediction": 1000.0})  # both impossible for the tiny run
    start = time.perf_counter()
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 1, "--predict-only", "--device", "cpu", "--disable-tta"])
    elapsed = time.perf_counter() - start
    assert not stale.exists() and (folder / "predictions" / "test" / "confidence.json").is_file()
    seconds = _seconds(folder)  # the training seconds kept, the prediction seconds those of this prediction
    assert seconds["training"] == 123.25 and 0 < seconds["prediction"] <= elapsed and set(seconds) == {
        "training", "prediction"}


@pytest.mark.parametrize("args, message", [
    ([511, "3d_fullres", "nnunet", 4], "fold 4 does not exist in the loco split. Valid folds: fold 0 holds out center C1"),
    ([511, "3d_fullres", "nnunet", 3, "--split", "scanner"], "fold 3 does not exist in the scanner split"),
    ([511, "3d_fullres", "sam9", 0], "unknown method 'sam9'; choose from nnunet, calunet"),
    ([599, "3d_fullres", "nnunet", 0], "no CalibPlans.json for dataset 599"),
    ([511, "3d_lowres", "nnunet", 0], "configuration 3d_lowres is not in"),
])
def test_bad_requests_give_one_clear_message(tiny_dataset, args, message):
    tiny_dataset.activate()
    result = run_cli(train_cli.main, args, expect_ok=False)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_non_finite_loss_names_the_step_and_the_term(tiny_dataset):
    from calibnet.paths import setup_data_roots
    from calibnet.trainers.nnUNetTrainerCalib import NonFiniteLossError
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec

    tiny_dataset.activate()
    roots = setup_data_roots()
    trainer, *_ = prepare_trainer(RunSpec(511, "3d_fullres", "calunet", 0, seed=5), roots.preprocessed,
                                  roots.results, "cpu")
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    data = torch.full((2, 2, *patch), float("nan"))
    target = [torch.zeros((2, 1, *[int(round(p * s)) for p, s in zip(patch, scale)]))
              for scale in trainer._get_deep_supervision_scales()]
    trainer.on_train_epoch_start()
    with pytest.raises(NonFiniteLossError, match="segmentation loss term is not finite at epoch 0, step 1"):
        trainer.train_step({"data": data, "target": target})


def _calunet_batch(tiny_dataset):
    """An initialised calunet trainer and a fixed batch of two patches with deep-supervision targets."""
    from calibnet.paths import setup_data_roots
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.runs import RunSpec

    tiny_dataset.activate()
    roots = setup_data_roots()
    trainer, *_ = prepare_trainer(RunSpec(511, "3d_fullres", "calunet", 0, seed=5), roots.preprocessed, roots.results,
                                  "cpu")
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    generator = torch.Generator().manual_seed(3)
    data = torch.randn((2, 2, *patch), generator=generator)
    shapes = [[int(round(p * s)) for p, s in zip(patch, scale)] for scale in trainer._get_deep_supervision_scales()]
    target = [torch.randint(0, 2, (2, 1, *shape), generator=generator).float() for shape in shapes]
    return trainer, data, target


def test_calunet_fip_is_half_the_mean_of_each_patchs_squared_gradient_norm(tiny_dataset):
    """Each patch run through the network on its own, its own deep-supervised nnU-Net loss differentiated
    with respect to the decoder's input (the skips): FIP = ½·mean over patches of the squared norms."""
    trainer, data, target = _calunet_batch(tiny_dataset)
    trainer.fip_estimator = "exact"
    terms = trainer.loss_terms(data, target)
    squared = []
    for b in range(2):
        z = [s.clone() for s in trainer.network.encoder(data[b:b + 1])]
        loss = trainer.loss(trainer.network.decoder(z), [t[b:b + 1] for t in target])
        squared.append(sum(g.pow(2).sum() for g in torch.autograd.grad(loss, z)).item())
    assert terms["FIP"].item() == pytest.approx(0.5 * np.mean(squared), rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the FIP path stays float32 under mixed precision
        mixed = trainer.loss_terms(data, target)
    assert mixed["FIP"].dtype == torch.float32 and mixed["FIP"].item() == pytest.approx(terms["FIP"].item(), rel=1e-2)


def test_calunet_amortised_fip_adds_the_last_fresh_fip_gradient_to_each_steps_own(tiny_dataset):
    """--fip-estimator amortised (every 3rd step afresh): step 0 updates with the exact gradient of segmentation +
    λ1·FIP + λ2·CMP; steps 1 and 2 with their own batch's segmentation + CMP gradient plus step 0's λ1·∇FIP (and log
    step 0's FIP); step 3 takes FIP afresh on its own batch. Gradients are read at the optimiser step (not taken)."""
    trainer, data, target = _calunet_batch(tiny_dataset)
    parameters = list(trainer.network.parameters())
    batches = [(data, target), (data.flip(0), [t.flip(0) for t in target]), (data * 0.5, target), (-data, target)]

    def gradient(value):
        grads = torch.autograd.grad(value, parameters, allow_unused=True, retain_graph=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters)]

    def clipped(grads):  # nnU-Net clips the gradient norm at 12
        norm = torch.norm(torch.stack([g.norm() for g in grads]))
        return [g * min(1.0, 12 / (float(norm) + 1e-6)) for g in grads]

    trainer.fip_estimator = "exact"
    expected, fip_values = [], []
    for step, (x, y) in enumerate(batches):
        terms = trainer.loss_terms(x, y)
        rest = gradient(terms["segmentation loss"] + trainer.lambda_cmp * terms["CMP"])
        fip = gradient(trainer.lambda_fip * terms["FIP"])
        if step % 3 == 0:
            kept, kept_value = fip, terms["FIP"].item()
        expected.append(clipped([a + b for a, b in zip(rest, kept)]))
        fip_values.append(kept_value)
    recorded = []
    trainer.optimizer.step = lambda: recorded.append([p.grad.clone() for p in parameters])  # weights stay put
    trainer.fip_estimator, trainer.fip_every, trainer.step_in_epoch = "amortised", 3, 0
    losses = [float(trainer.train_step({"data": x, "target": y})["loss"]) for x, y in batches]
    for step in range(4):
        reference = torch.cat([g.reshape(-1) for g in expected[step]])
        got = torch.cat([g.reshape(-1) for g in recorded[step]])
        assert float((got - reference).abs().max() / reference.abs().max()) < 1e-4, step
    trainer.fip_estimator = "exact"
    for step, (x, y) in enumerate(batches):  # the logged loss carries the kept FIP
        terms = trainer.loss_terms(x, y)
        logged = terms["segmentation loss"].item() + trainer.lambda_cmp * terms["CMP"].item() + \
            trainer.lambda_fip * fip_values[step]
        assert losses[step] == pytest.approx(logged, rel=1e-4)


def test_calib_predict_on_new_images(tiny_dataset, trained, tmp_path):
    trained["calunet"], trained["guided_nnunet"]  # trained here when this test runs alone
    tiny_dataset.activate()
    incoming, labels = tmp_path / "incoming", tmp_path / "labels"
    incoming.mkdir()
    labels.mkdir()
    for case in ("C4_000", "C3_001"):
        for channel in (0, 1):
            shutil.copy(tiny_dataset.raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz", incoming)
        shutil.copy(tiny_dataset.raw / "labelsTr" / f"{case}.nii.gz", labels)
    out = tmp_path / "out"
    output = run_cli(predict_cli.main, ["-d", 511, "-m", "calunet", "-f", 1, "-i", incoming, "-o", out,
                                        "--device", "cpu", "--disable-tta"]).output
    assert "predicted 2 case(s) with calunet" in output and "C4_000: mean max-probability" in output
    assert sorted(p.name for p in out.iterdir()) == ["C3_001.nii.gz", "C3_001.npz", "C3_001.pkl", "C4_000.nii.gz",
                                                      "C4_000.npz", "C4_000.pkl", "confidence.json", "dataset.json",
                                                      "plans.json"]
    result = run_cli(predict_cli.main, ["-d", 511, "-m", "guided_nnunet", "-f", 1, "-i", incoming, "-o", tmp_path / "g",
                                        "--device", "cpu", "--disable-tta"], expect_ok=False)
    assert result.exit_code == 1 and "needs point prompts" in result.output
    run_cli(predict_cli.main, ["-d", 511, "-m", "guided_nnunet", "-f", 1, "-i", incoming, "-o", tmp_path / "g",
                               "--device", "cpu", "--disable-tta", "--prompts-from", labels, "--no-save-probabilities"])
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["C3_001.nii.gz", "C4_000.nii.gz", "confidence.json",
                                                                   "dataset.json", "plans.json"]
    result = run_cli(predict_cli.main, ["-d", 511, "-m", "focal", "-f", 3, "-i", incoming, "-o", tmp_path / "x"],
                     expect_ok=False)
    assert result.exit_code == 1 and "calibnet_run.json is missing" in result.output


def test_checkpoint_of_another_architecture_is_refused(tiny_dataset, trained, tmp_path):
    from calibnet.errors import CalibnetError
    from calibnet.inference.model_loading import load_model

    guided = tmp_path / "guided_run"
    shutil.copytree(trained["guided_nnunet"][1], guided, ignore=shutil.ignore_patterns("predictions"))
    for name in ("plans.json", "dataset.json"):
        shutil.copy(trained["guided_nnunet"][1].parent / name, tmp_path)
    shutil.copy(trained["nnunet"][1] / "checkpoint_final.pth", guided / "checkpoint_final.pth")
    with pytest.raises(CalibnetError, match="was written by nnUNetTrainerCalib, but this run folder belongs to "
                                            "nnUNetTrainerGuided"):
        load_model(guided, "cpu")
    checkpoint = torch.load(guided / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainerGuided"  # right name, weights of a 2-channel network
    torch.save(checkpoint, guided / "checkpoint_final.pth")
    with pytest.raises(CalibnetError, match="does not fit the nnUNetTrainerGuided architecture"):
        load_model(guided, "cpu")
    (guided / "checkpoint_final.pth").write_bytes(b"truncated")
    with pytest.raises(CalibnetError, match="cannot be read as a checkpoint"):
        load_model(guided, "cpu")


def test_continue_without_a_checkpoint_writes_nothing(tiny_dataset):
    tiny_dataset.activate()
    result = run_cli(train_cli.main, [511, "3d_fullres", "dicepp", 2, "--continue", *SHORT], expect_ok=False)
    assert result.exit_code == 1 and "--continue: no checkpoint in" in result.output
    assert not _results(tiny_dataset, "nnUNetTrainerDicePP", fold=2).exists()


def _band(columns=None):
    """A 6 × 10 mask holding rows 2-3 of ``columns`` (start, stop); empty for None. Two rows thick, so every
    voxel is a surface voxel."""
    mask = np.zeros((6, 10), bool)
    if columns:
        mask[2:4, columns[0]:columns[1]] = True
    return mask


def test_mc_agreement_is_the_mean_over_labels_of_the_mean_pairwise_agreement():
    """Three samples, two labels, 1 mm voxels; each N uses the first N samples.

    Label a: columns 1-4 (8 voxels), 1-2 (4), 3-6 (8). Dice of the pairs (0,1), (0,2), (1,2): 2·4/12 = 2/3,
    2·4/16 = 1/2, 0. NSD@1mm (voxels within 1 mm of the other surface): (6 + 4)/12 = 5/6, (6 + 6)/16 = 3/4,
    (2 + 2)/12 = 1/3. Label b: empty, empty, columns 1-4: both empty = 1, then 0 and 0 for Dice and NSD alike.
    """
    from calibnet.inference.scores import mc_agreement_scores

    samples = [(_band((1, 5)), _band()), (_band((1, 3)), _band()), (_band((3, 7)), _band((1, 5)))]
    scores = mc_agreement_scores(np.array(samples), ["a", "b"], [3, 2], (1.0, 1.0))
    expected = {
        "mc_dice_agreement_n2_per_label": {"a": 2 / 3, "b": 1.0},
        "mc_nsd_agreement_n2_per_label": {"a": 5 / 6, "b": 1.0},
        "mc_dice_agreement_n3_per_label": {"a": (2 / 3 + 1 / 2 + 0) / 3, "b": 1 / 3},
        "mc_nsd_agreement_n3_per_label": {"a": (5 / 6 + 3 / 4 + 1 / 3) / 3, "b": 1 / 3},
    }
    expected.update({name[:-len("_per_label")]: np.mean(list(per_label.values()))
                     for name, per_label in list(expected.items())})
    assert scores.keys() == expected.keys()
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name
    assert scores["mc_dice_agreement_n3"] == pytest.approx(13 / 36) and scores["mc_dice_agreement_n2"] == pytest.approx(5 / 6)


def test_mc_sample_counts_need_two_samples_each():
    from calibnet.errors import CalibnetError
    from calibnet.inference.scores import mc_agreement_scores, mc_sample_counts

    assert mc_sample_counts([15, 2, 15]) == (2, 15) and mc_sample_counts(()) == ()
    with pytest.raises(CalibnetError, match="--mc-samples 1: .*N >= 2"):
        mc_sample_counts([1, 15])
    with pytest.raises(ValueError, match="for N up to 3"):
        mc_agreement_scores(np.zeros((2, 1, 4, 4), bool), ["a"], [3], (1.0, 1.0))


def test_mc_samples_are_single_unmirrored_dropout_forwards(tiny_dataset, trained):
    """max(N) passes with dropout on and mirroring off, one network forward per sliding window each; the
    scores of every N are those of the first N of these samples; mirroring and dropout are restored after."""
    from calibnet.metrics.segmentation import case_metrics, overlap_metrics
    from calibnet.inference.cases import prepare_case, raw_case_inputs
    from calibnet.inference.model_loading import load_model
    from calibnet.inference.scores import mc_dropout_scores
    from calibnet.networks.mc_dropout import MCDropout

    folder = trained["nnunet_dropout"][1]
    model = load_model(folder, "cpu", use_mirroring=True)
    predictor = model.predictor
    assert predictor.use_mirroring and predictor.allowed_mirroring_axes, "the test needs a mirroring predictor"
    case = raw_case_inputs(tiny_dataset.raw, [_fold(tiny_dataset, "loco", 1)["test"][0]], model.dataset_json)[0]
    prepared = prepare_case(model, case, 0)
    data, properties = prepared.data, prepared.properties
    dropouts = [m for m in predictor.network.modules() if isinstance(m, MCDropout)]
    forwards = []
    predictor.network.register_forward_hook(
        lambda *_: forwards.append((all(m.sampling for m in dropouts), predictor.use_mirroring)))
    predictor.use_mirroring = False
    predictor.predict_logits_from_preprocessed_data(data)
    windows = len(forwards)  # forwards of one unmirrored pass
    predictor.use_mirroring = True
    forwards.clear()
    predictor.predict_logits_from_preprocessed_data(data)
    assert len(forwards) == windows * 2 ** len(predictor.allowed_mirroring_axes)  # what a mirrored sample cost

    samples = []
    predict = predictor.predict_logits_from_preprocessed_data
    predictor.predict_logits_from_preprocessed_data = lambda x: samples.append(predict(x).float()) or samples[-1]
    forwards.clear()
    scores = mc_dropout_scores(model, data, [3, 2], len(case.images), properties)
    assert forwards == [(True, False)] * (3 * windows)
    assert len(samples) == 3 and predictor.use_mirroring and not any(m.sampling for m in dropouts)

    spacing = model.configuration_manager.spacing
    masks = [(torch.softmax(s, 0).argmax(0) == 1).numpy() for s in samples]
    roi = (data[:len(case.images)] != 0).any(0)
    for n in (2, 3):
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        dice = np.mean([overlap_metrics(masks[i], masks[j])["DSC"] for i, j in pairs])
        nsd = np.mean([case_metrics(masks[i], masks[j], spacing)["NSD@1mm"] for i, j in pairs])
        mean = torch.stack([torch.softmax(s, 0) for s in samples[:n]]).mean(0)
        entropy = -(mean * mean.clamp_min(1e-7).log()).sum(0) / np.log(2)
        assert scores[f"mc_dice_agreement_n{n}"] == pytest.approx(dice, abs=1e-9)
        assert scores[f"mc_dice_agreement_n{n}_per_label"] == {"lesion": scores[f"mc_dice_agreement_n{n}"]}
        assert scores[f"mc_nsd_agreement_n{n}"] == pytest.approx(nsd, abs=1e-9)
        assert scores[f"mc_mean_entropy_n{n}"] == pytest.approx(float(entropy[roi].mean()), abs=1e-6)


def test_mc_dropout_scores_of_several_n_in_one_prediction(tiny_dataset, trained):
    tiny_dataset.activate()
    folder = trained["nnunet_dropout"][1]
    run_cli(train_cli.main, [511, "3d_fullres", "nnunet_dropout", 1, "--predict-only", "--device", "cpu",
                             "--disable-tta", "--mc-samples", 3, "--mc-samples", 2])
    names = {f"mc_{kind}_agreement_n{n}{suffix}" for kind in ("dice", "nsd") for n in (2, 3)
             for suffix in ("", "_per_label")} | {"mc_mean_entropy_n2", "mc_mean_entropy_n3"}
    for role in ("val", "test"):
        confidence = json.loads((folder / "predictions" / role / "confidence.json").read_text())
        for scores in confidence.values():
            assert {k for k in scores if k.startswith("mc_")} == names
            for n in (2, 3):
                for kind in ("dice", "nsd"):
                    assert scores[f"mc_{kind}_agreement_n{n}_per_label"] == \
                        {"lesion": scores[f"mc_{kind}_agreement_n{n}"]}
    result = run_cli(train_cli.main, [511, "3d_fullres", "nnunet_dropout", 1, "--predict-only", "--device", "cpu",
                                      "--mc-samples", 1], expect_ok=False)
    assert result.exit_code == 2 and "--mc-samples" in result.output and "x>=2" in result.output
    predictions = trained["nnunet"][1] / "predictions"  # a finished run without dropout
    before = {p: p.read_bytes() for p in predictions.rglob("*") if p.is_file()}
    result = run_cli(train_cli.main, [511, "3d_fullres", "nnunet", 1, "--predict-only", "--device", "cpu",
                                      "--disable-tta", "--mc-samples", 2], expect_ok=False)
    assert result.exit_code == 1 and "--mc-samples needs a model trained with dropout" in result.output
    assert before and {p: p.read_bytes() for p in predictions.rglob("*") if p.is_file()} == before  # kept whole


def test_dropout_is_off_in_plain_prediction_and_on_for_sampling():
    from calibnet.networks.mc_dropout import MCDropout

    layer = MCDropout(p=0.5).eval()
    x = torch.ones(1000)
    assert torch.equal(layer(x), x)
    layer.sampling = True
    assert (layer(x) == 0).any()


def _printed_command(output: str, input_dir, output_dir) -> tuple:
    """(environment, argv) of the nnU-Net command calib_export printed last, with the folders filled in."""
    words = shlex.split(output.strip().splitlines()[-1])
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    argv = [w.replace("INPUT_FOLDER", str(input_dir)).replace("OUTPUT_FOLDER", str(output_dir)) for w in words[len(env):]]
    return env, argv


def _segmentation(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _one_case(tiny_dataset, folder, case):
    folder.mkdir()
    for channel in (0, 1):
        shutil.copy(tiny_dataset.raw / "imagesTr" / f"{case}_{channel:04d}.nii.gz", folder)
    return folder


@pytest.mark.parametrize("alias", ["nnunet", "calunet"])
def test_nnunet_predict_of_an_exported_run_is_voxel_identical_to_calib_predict(tiny_dataset, trained, tmp_path,
                                                                               monkeypatch, alias):
    """nnUNetv2_predict exactly as calib_export prints it (its entry point in this process, one process: -npp 0
    -nps 0), with no nnUNet_extTrainer, both without mirroring; calib_predict's folder holds what nnU-Net's does."""
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    folder = trained[alias][1]
    tiny_dataset.activate()
    incoming = _one_case(tiny_dataset, tmp_path / "incoming", "C4_000")
    try:
        output = run_cli(export_cli.main, [511, "3d_fullres", alias, 1]).output
        env, argv = _printed_command(output, incoming, tmp_path / "nnunet")
        assert set(env) == {"nnUNet_results"} and argv[:3] == ["nnUNetv2_predict", "-d", "Dataset511_Tiny"]
        monkeypatch.delenv("nnUNet_extTrainer", raising=False)  # calib_train sets it in this process
        monkeypatch.setenv("nnUNet_results", env["nnUNet_results"])
        monkeypatch.setattr(sys, "argv", argv + ["--disable_tta", "-device", "cpu", "-npp", "0", "-nps", "0",
                                                 "--save_probabilities"])
        threads = torch.get_num_threads()
        try:
            predict_entry_point()
        finally:
            torch.set_num_threads(threads)
    finally:
        shutil.rmtree(folder.parent / "fold_1", ignore_errors=True)  # the trainer folder is shared with other tests
    ours = tmp_path / "calib"
    run_cli(predict_cli.main, ["-d", 511, "-m", alias, "-f", 1, "-i", incoming, "-o", ours, "--device", "cpu",
                               "--disable-tta"])
    theirs = tmp_path / "nnunet"
    assert np.array_equal(_segmentation(theirs / "C4_000.nii.gz"), _segmentation(ours / "C4_000.nii.gz"))
    assert np.array_equal(np.load(theirs / "C4_000.npz")["probabilities"], np.load(ours / "C4_000.npz")["probabilities"])
    assert {p.name for p in ours.iterdir()} - {"confidence.json"} == \
        {p.name for p in theirs.iterdir()} - {"predict_from_raw_data_args.json"}
    for name in ("dataset.json", "plans.json"):
        assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name


def test_a_network_calibnet_builds_opens_in_nnunet_with_the_printed_ext_trainer(tiny_dataset, trained, tmp_path,
                                                                              monkeypatch):
    """nnunet_dropout exported to a model folder of its own: nnU-Net cannot find its trainer without the
    nnUNet_extTrainer calib_export prints, and predicts the run's own val segmentation with it (what
    nnUNetv2_predict_from_modelfolder runs, in this process)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = trained["nnunet_dropout"][1]
    tiny_dataset.activate()
    case = _fold(tiny_dataset, "loco", 1)["val"][0]
    incoming, model = _one_case(tiny_dataset, tmp_path / "incoming", case), tmp_path / "model"
    output = run_cli(export_cli.main, [511, "3d_fullres", "nnunet_dropout", 1, "-o", model]).output
    env, argv = _printed_command(output, incoming, tmp_path / "nnunet")
    assert set(env) == {"nnUNet_extTrainer"} and argv[:5] == ["nnUNetv2_predict_from_modelfolder", "-m", str(model),
                                                              "-f", "1"]
    assert sorted(p.name for p in model.iterdir()) == ["dataset.json", "fold_1", "plans.json"]
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(RuntimeError, match="Could not find requested nnunet trainer nnUNetTrainerDropout"):
        nnUNetPredictor(device=torch.device("cpu")).initialize_from_trained_model_folder(str(model), (1,))
    monkeypatch.setenv("nnUNet_extTrainer", env["nnUNet_extTrainer"])
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (1,))
    (tmp_path / "nnunet").mkdir()
    predictor.predict_from_files_sequential(str(incoming), str(tmp_path / "nnunet"), False, True, None)
    assert np.array_equal(_segmentation(tmp_path / "nnunet" / f"{case}.nii.gz"),
                          _segmentation(folder / "predictions" / "val" / f"{case}.nii.gz"))  # calib_train: no TTA


def test_nnunet_ensemble_merges_calibnet_prediction_folders(tiny_dataset, trained, tmp_path):
    """nnUNetv2_ensemble's function on the val predictions of two runs: the mean of their probabilities, argmax."""
    from nnunetv2.ensembling.ensemble import ensemble_folders

    folders = [trained[alias][1] / "predictions" / "val" for alias in ("nnunet", "calunet")]
    ensemble_folders([str(f) for f in folders], str(tmp_path / "ensemble"), num_processes=1)
    cases = sorted(json.loads((folders[0] / "confidence.json").read_text()))
    assert len(cases) == 3
    for case in cases:
        first, second = (np.load(f / f"{case}.npz")["probabilities"] for f in folders)
        merged = sitk.ReadImage(str(tmp_path / "ensemble" / f"{case}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(merged), ((first.astype(np.float32) + second) / 2).argmax(0))
        assert merged.GetSpacing() == sitk.ReadImage(str(folders[0] / f"{case}.nii.gz")).GetSpacing()


def test_confidence_head_seconds_go_into_the_base_record(tiny_dataset, trained):
    """A head's training and scoring seconds in its base's record, under the head's folder name; --predict-only
    replaces the scoring seconds only. (Last in the file: the head stays in the focal run.)"""
    tiny_dataset.activate()
    base = trained["focal"][1]
    before = _seconds(base)
    start = time.perf_counter()
    output = run_cli(train_cli.main, [511, "3d_fullres", "confidence_head", 1, "--base", "focal", "--no-adversarial",
                                      "--warmup-batches", 1, *SHORT]).output
    elapsed = time.perf_counter() - start
    seconds = _seconds(base)
    head = seconds.pop("confidence_heads")
    assert seconds == before and set(head) == {"confidence_head_plain"}
    head = head["confidence_head_plain"]
    assert set(head) == {"training", "scoring"} and 0 < head["training"] and 0 < head["scoring"]
    assert head["training"] + head["scoring"] <= elapsed
    assert f"trained confidence head: {base / 'confidence_head_plain'} ({head['training']:.1f} s)" in output
    _set_seconds(base, {**before, "confidence_heads": {"confidence_head_plain": {"training": 77.5, "scoring": 1e4}}})
    run_cli(train_cli.main, [511, "3d_fullres", "confidence_head", 1, "--base", "focal", "--no-adversarial",
                             "--predict-only", "--device", "cpu"])
    rescored = _seconds(base)["confidence_heads"]["confidence_head_plain"]
    assert rescored["training"] == 77.5 and 0 < rescored["scoring"] < 1e4

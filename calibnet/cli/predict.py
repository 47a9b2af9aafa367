"""calib_predict: segment new images with a trained calibnet model."""
from __future__ import annotations

from pathlib import Path

import click

from calibnet.cli.common import data_roots, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-d", "--dataset-id", type=int, required=True, help="Dataset the model was trained on.")
@click.option("-m", "--method", required=True, help="Method alias (calib_train --list).")
@click.option("-f", "--fold", type=int, required=True)
@click.option("-c", "--configuration", default="3d_fullres", show_default=True)
@click.option("--split", type=click.Choice(["loco", "scanner"]), default="loco", show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the training run to use.")
@click.option("-i", "--input-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Images named CASE_0000.nii.gz, CASE_0001.nii.gz, ... (one file per channel).")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--save-probabilities/--no-save-probabilities", default=True, show_default=True,
              help="Write CASE.npz with the softmax probabilities (float16).")
@click.option("--disable-tta", is_flag=True, help="No mirroring test-time augmentation.")
@click.option("--mc-samples", type=click.IntRange(2), multiple=True,
              help="N MC-dropout samples per case (nnunet_dropout models; N >= 2, one dropout forward each, no "
                   "mirroring): adds mc_dice_agreement_nN, mc_nsd_agreement_nN and mc_mean_entropy_nN. Repeat for "
                   "several N (--mc-samples 2 --mc-samples 15): max(N) samples, the first N for each.")
@click.option("--confidence", is_flag=True,
              help="Require the run's confidence heads (calib_train ... confidence_head --base METHOD) and print "
                   "each case's predicted Dice and NSD; their scores go to confidence.json whenever heads exist.")
@click.option("--flag-below", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="With --confidence: warn about cases whose predicted Dice is below this, for review.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--prompts", "prompt_setting", default=None,
              help="SAM methods: prompts of this prompt-quality setting (3P, 3B0.5, 3P+3B0.5, P50, B150, ...) "
                   "drawn from the --prompts-from labels instead of the method's own.")
@click.option("--prompts-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of CASE.nii.gz labels to derive the prompts from (guided_nnunet and SAM methods).")
@user_errors
def main(dataset_id, method, fold, configuration, split, seed, input_dir, output_dir, save_probabilities, disable_tta,
         mc_samples, confidence, flag_below, device, prompt_setting, prompts_from):
    """Predict every case in INPUT_DIR with the model trained by calib_train DATASET CONFIGURATION METHOD FOLD;
    writes segmentations, probabilities and confidence.json to OUTPUT_DIR."""
    from calibnet.errors import CalibnetError
    from calibnet.inference.predict import flagged_cases, folder_case_inputs, load_model, predict_cases
    from calibnet.methods import get_method
    from calibnet.launch.training_run import default_device, locate_run
    from calibnet.runs import RunSpec

    roots = data_roots()
    if get_method(method).trains_head:
        raise CalibnetError(f"{method} is not a segmentation model: predict with the method it was trained on, "
                            f"e.g. calib_predict -m nnunet --confidence.")
    spec = RunSpec(dataset_id, configuration, method, fold, split, seed)
    folder = locate_run(spec, roots.preprocessed, roots.results)
    model = load_model(folder, device or default_device(), use_mirroring=not disable_tta)
    if confidence and not model.heads:
        raise CalibnetError(f"--confidence: {folder} has no trained confidence head; train one with calib_train "
                            f"{dataset_id} {configuration} confidence_head {fold} --split {split} --base {method}.")
    if prompt_setting is not None:
        from calibnet.prompt_quality import parse_setting
        parse_setting(prompt_setting)
        if not model.is_sam:
            raise CalibnetError(f"--prompts applies to SAM methods, not {method}.")
    cases = folder_case_inputs(input_dir, model.dataset_json, prompts_from)
    confidences = predict_cases(model, cases, output_dir, save_probabilities=save_probabilities, prompt_seed=seed,
                                mc_samples=sorted(set(mc_samples)), prompt_setting=prompt_setting)
    note = model.record.get("note")
    click.echo(f"predicted {len(cases)} case(s) with {method} ({folder}) into {output_dir}"
               + (f" — {note}" if note else ""))
    for case_id, scores in confidences.items():
        predicted = [f"{name.replace('_', ' ')} {value:.3f}" for name, value in scores.items()
                     if "_predicted_" in f"_{name}" and not isinstance(value, dict)]
        click.echo(f"  {case_id}: mean max-probability over predicted foreground "
                   f"{scores['mean_max_probability_foreground']:.3f}, foreground entropy "
                   f"{scores['entropy_foreground']:.3f}" + ("; " + ", ".join(predicted) if confidence else ""))
    if confidence:
        for case_id, dice in flagged_cases(confidences, flag_below).items():
            click.echo(f"warning: {case_id}: predicted Dice {dice:.3f} < {flag_below:g}; review this scan.")


if __name__ == "__main__":
    main()

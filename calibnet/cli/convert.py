"""calib_convert: write a dataset in nnU-Net raw format with center/vendor metadata."""
from __future__ import annotations

import os
from pathlib import Path

import click

from calibnet import api
from calibnet.cli.common import DATASET, CalibCommand, data_roots, parse_int_tuple, user_errors


def _list_converters(ctx, _param, value):
    if not value or ctx.resilient_parsing:
        return
    for line in api.converter_list():
        click.echo(line)
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--list", "list_", is_flag=True, expose_value=False, is_eager=True, callback=_list_converters,
              help="Show every converter with the layout it expects.")
def main():
    """Convert a dataset to nnU-Net raw format plus domains.csv (center, vendor per case).

    Datasets land in $nnUNet_raw (default $CALIBNET_DATA/raw). The input folder is only read.
    """


@main.command("synthetic", cls=CalibCommand)
@click.option("-d", "--dataset-id", type=int, default=501, show_default=True, help="nnU-Net dataset id.")
@click.option("--name", default="SynthBrain", show_default=True, help="Dataset name (DatasetXXX_NAME).")
@click.option("--seed", type=int, default=42, show_default=True, help="Everything is deterministic from it.")
@click.option("--centers", "n_centers", type=click.IntRange(1), default=4, show_default=True,
              help="Number of centers; vendors are assigned in turn Siemens, GE, Philips, Siemens, ...")
@click.option("--cases-per-center", type=click.IntRange(1), default=8, show_default=True)
@click.option("--shape", default="64", show_default=True,
              help="Volume shape in voxels: one integer (cube) or X,Y,Z. The isotropic spacing is chosen so "
                   "the field of view holds the brain (64 → 2.94 mm, 32 → 5.9 mm).")
@click.option("--channels", default="T1,FLAIR", show_default=True,
              help="Comma-separated channels from T1, T1c, T2, FLAIR.")
@click.option("--labels", "label_mode", type=click.Choice(["lesion", "brats"]), default="lesion", show_default=True,
              help="lesion: binary lesions; brats: edema/necrosis/enhancing with nnU-Net regions.")
@click.option("--preview/--no-preview", default=True, show_default=True,
              help="Save preview.png: one axial slice per center, to see the domain shift.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset of the same id and name.")
@click.option("-np", "--num-processes", type=click.IntRange(1), default=min(2, os.cpu_count() or 1),
              show_default=True, help="Worker processes generating cases.")
@user_errors
def synthetic(dataset_id, name, seed, n_centers, cases_per_center, shape, channels, label_mode, preview,
              overwrite, num_processes):
    """The embedded multi-center brain-lesion benchmark (no download needed)."""
    roots = data_roots()
    result = api.convert_synthetic(dataset_id, name, seed, n_centers, cases_per_center,
                                   parse_int_tuple(shape, 3, "--shape"),
                                   tuple(c.strip() for c in channels.split(",") if c.strip()), label_mode, preview,
                                   overwrite, num_processes, roots)
    for line in result.lines:
        click.echo(line)


@main.command("corrupt", cls=CalibCommand)
@click.option("-d", "--dataset-id", type=DATASET, required=True,
              help="Source dataset: id, folder name (Dataset501_SynthBrain) or name.")
@click.option("--to", "target_id", type=int, required=True, help="Id of the corrupted copy to write.")
@click.option("--artifacts", default="motion,ghosting,bias,spike,noise", show_default=True,
              help="Comma-separated TorchIO artifacts: motion, ghosting, bias, spike, noise.")
@click.option("--severity", default="3", show_default=True, help="Severities 1 (mild) to 5 (severe), comma-separated.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--clean/--no-clean", default=True, show_default=True, help="Also keep an unchanged copy of each case.")
@click.option("--name", default=None, help="Dataset name of the copy (default: the source's name + 'C').")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset of the same id and name.")
@user_errors
def corrupt(dataset_id, target_id, artifacts, severity, seed, clean, name, overwrite):
    """ATLAS-C style corrupted copies of a dataset: one copy of every case per artifact and severity,
    labels unchanged, the artifact in domains.csv's 'condition' column."""
    roots = data_roots()
    severities = parse_int_tuple(severity, len(severity.split(",")), "--severity")
    result = api.convert_corrupt(dataset_id, target_id, [a.strip() for a in artifacts.split(",") if a.strip()],
                                 list(severities), seed=seed, include_clean=clean, name=name, overwrite=overwrite,
                                 roots=roots)
    for line in result.lines:
        click.echo(line)


def _public_command(name: str, extra_options=()):
    """The click command of one public-dataset converter: -i INPUT_DIR -d ID plus its own options."""
    converter = api.public_converters()[name]

    @user_errors
    def command(input_dir, dataset_id, name_, overwrite, **options):
        roots = data_roots()
        result = api.convert_public(converter.name, input_dir, dataset_id, name_, overwrite, roots, **options)
        for line in result.lines:
            click.echo(line)

    params = [
        click.Option(["-i", "--input-dir"], type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
                     help="The folder the publisher's archive unpacks to (or its parent)."),
        click.Option(["-d", "--dataset-id"], type=int, required=True, help="nnU-Net dataset id to write."),
        click.Option(["--name", "name_"], default=None,
                     help=f"Dataset name (default {converter.default_dataset_name})."),
        click.Option(["--overwrite"], is_flag=True, help="Replace an existing dataset of the same id and name."),
        *extra_options,
    ]
    main.add_command(CalibCommand(name, callback=command, params=params,
                                  help=f"{converter.title}.\n\nExpects: {converter.layout}"))


_public_command("brats", [
    click.Option(["--year"], type=click.Choice(["2021", "2023", "2024"]), default="2023", show_default=True,
                 callback=lambda _c, _p, v: int(v), help="BraTS release: file names and label values differ."),
    click.Option(["--centers", "centers_csv"], type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="FeTS partitioning_1.csv (Partition_ID,Subject_ID) or a case,center CSV."),
    click.Option(["--vendors", "vendors_csv"], type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="case,vendor CSV; without it the vendor is 'unknown' and the scanner split is skipped."),
])
for _name in ("atlas2", "mnms", "mnms2", "prostate_ms", "ibsr18"):
    _public_command(_name)


if __name__ == "__main__":
    main()

"""ATLAS-C style corrupted copies of a raw dataset: each case re-acquired with one MRI artifact at a
chosen severity, labels unchanged, the artifact recorded in the ``condition`` column of
``domains.csv`` so that the evaluation can treat it as the domain shift.

Artifacts are TorchIO's random transforms with ranges set by severity (1 = mild … 5 = severe); every
corrupted case is reproducible from ``(seed, case, artifact, severity)``. All channels of a case get
the same artifact parameters, as one acquisition would.
"""
from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torchio as tio
from tqdm import tqdm

from calibnet.dataset_conversion.raw_dataset import target_dataset_folder
from calibnet.domains import DOMAINS_FILENAME, check_domains_cover_cases, read_domains, write_domains
from calibnet.errors import CalibnetError
from calibnet.files import atomic_output_dir, atomic_write_json
from calibnet.raw_dataset_checks import list_cases, read_dataset_json

SEVERITIES = (1, 2, 3, 4, 5)
ARTIFACTS = ("motion", "ghosting", "bias", "spike", "noise")


def artifact_transform(artifact: str, severity: int, robust_max: float) -> tio.Transform:
    """TorchIO transform for ``artifact`` at ``severity``; ``robust_max`` (99th percentile of the
    case's non-zero voxels) scales the additive noise to the image's intensity range."""
    s = severity / 5
    if artifact == "motion":
        return tio.RandomMotion(degrees=(severity, severity), translation=(severity, severity),
                                num_transforms=1 + severity // 2)
    if artifact == "ghosting":
        return tio.RandomGhosting(num_ghosts=(2 + severity, 2 + severity), axes=(0, 1, 2),
                                  intensity=(0.3 + 0.5 * s, 0.3 + 0.5 * s))
    if artifact == "bias":
        return tio.RandomBiasField(coefficients=(0.15 * severity, 0.15 * severity))
    if artifact == "spike":
        return tio.RandomSpike(num_spikes=(1, severity), intensity=(0.2 + 0.3 * s, 0.2 + 0.3 * s))
    if artifact == "noise":
        std = 0.02 * severity * robust_max
        return tio.RandomNoise(std=(std, std))
    raise CalibnetError(f"unknown artifact {artifact!r}; choose from {', '.join(ARTIFACTS)}.")


@dataclass(frozen=True)
class CorruptionJob:
    case_id: str
    new_case_id: str
    artifact: str  # "clean" for an unchanged copy
    severity: int
    images: tuple
    label: Path
    seed: tuple  # (seed, case id checksum, artifact, severity): the same copy whatever else is requested


def _corrupt_case(job: CorruptionJob, folder: Path, file_ending: str) -> None:
    channels = [sitk.ReadImage(str(p)) for p in job.images]
    arrays = [sitk.GetArrayFromImage(image).astype(np.float32) for image in channels]
    if job.artifact != "clean":
        nonzero = np.concatenate([a[a != 0] for a in arrays]) if any((a != 0).any() for a in arrays) else arrays[0]
        robust_max = float(np.percentile(np.abs(nonzero), 99)) or 1.0
        transform = artifact_transform(job.artifact, job.severity, robust_max)
        subject = tio.Subject({f"c{i}": tio.ScalarImage(tensor=torch.from_numpy(a[None].copy()))
                               for i, a in enumerate(arrays)})
        torch.manual_seed(int(np.random.SeedSequence(job.seed).generate_state(1)[0]))
        subject = transform(subject)
        arrays = [subject[f"c{i}"].data[0].numpy() for i in range(len(arrays))]
    for index, (image, array) in enumerate(zip(channels, arrays)):
        out = sitk.GetImageFromArray(array.astype(np.float32))
        out.CopyInformation(image)
        sitk.WriteImage(out, str(folder / "imagesTr" / f"{job.new_case_id}_{index:04d}{file_ending}"),
                        useCompression=True)
    shutil.copyfile(job.label, folder / "labelsTr" / f"{job.new_case_id}{file_ending}")


def convert_corrupt(source_folder: Path, raw_root: Path, target_id: int, artifacts: list, severities: list,
                    seed: int = 0, include_clean: bool = True, name: str | None = None, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Write dataset ``target_id``: for every source case, a clean copy (optional) and one copy per
    artifact and severity, named ``CASE_<artifact><severity>``. Returns the new folder."""
    unknown = [a for a in artifacts if a not in ARTIFACTS]
    if unknown or not artifacts:
        raise CalibnetError(f"unknown artifact {unknown[0] if unknown else '(none)'}; "
                            f"choose from {', '.join(ARTIFACTS)}.")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise CalibnetError(f"severity {bad[0] if bad else '(none)'} is not one of 1..5.")
    source_folder = Path(source_folder)
    dataset_json = read_dataset_json(source_folder)
    cases = list_cases(source_folder, dataset_json)
    domains = read_domains(source_folder / DOMAINS_FILENAME)
    check_domains_cover_cases(domains, cases.keys(), source_folder / DOMAINS_FILENAME)
    name = name or source_folder.name.split("_", 1)[1] + "C"
    final = target_dataset_folder(raw_root, target_id, name, overwrite)
    if final.resolve() == source_folder.resolve():
        raise CalibnetError("--to must name a new dataset, not the source.")

    conditions = ([("clean", 0)] if include_clean else []) + [(a, s) for a in artifacts for s in severities]
    jobs, rows = [], []
    by_case = domains.set_index("case_id")
    for case_id in sorted(cases):
        source_row = by_case.loc[case_id].to_dict()
        # all copies of a case stay on one side of every split
        patient = source_row.get("patient") or case_id
        for artifact, severity in conditions:
            new_id = f"{case_id}_{'clean' if artifact == 'clean' else f'{artifact}{severity}'}"
            jobs.append(CorruptionJob(case_id, new_id, artifact, severity, tuple(cases[case_id]["images"]),
                                      cases[case_id]["label"],
                                      (seed, zlib.crc32(case_id.encode()), (*ARTIFACTS, "clean").index(artifact),
                                       severity)))
            rows.append({"case_id": new_id, **source_row, "patient": patient, "condition": artifact,
                         "severity": severity, "source_case": case_id})
    with atomic_output_dir(final, overwrite=overwrite) as folder:
        (folder / "imagesTr").mkdir()
        (folder / "labelsTr").mkdir()
        for job in tqdm(jobs, desc="corrupting cases", unit="case", disable=not progress):
            _corrupt_case(job, folder, dataset_json["file_ending"])
        write_domains(pd.DataFrame(rows), folder / DOMAINS_FILENAME)
        new_json = dict(dataset_json, numTraining=len(jobs))
        new_json["calibnet_corruption"] = {"source": source_folder.name, "artifacts": list(artifacts),
                                           "severities": list(severities), "seed": seed,
                                           "include_clean": include_clean}
        atomic_write_json(folder / "dataset.json", new_json)
    return final

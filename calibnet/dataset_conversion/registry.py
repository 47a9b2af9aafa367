"""Every ``calib_convert`` converter by name, with the layout it expects (``calib_convert --list``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from calibnet.dataset_conversion.public_dataset import ConversionSummary, write_public_dataset


@dataclass(frozen=True)
class PublicConverter:
    name: str
    title: str
    default_dataset_name: str
    layout: str
    find: Callable  # (input_dir, **options) -> SourceCases


def _find(module: str, function: str) -> Callable:
    def find(*args, **kwargs):
        import importlib
        return getattr(importlib.import_module(f"calibnet.dataset_conversion.{module}"), function)(*args, **kwargs)
    return find


PUBLIC_CONVERTERS = {c.name: c for c in (
    PublicConverter("brats", "BraTS 2021 / 2023 GLI / 2024 GLI glioma", "BraTS",
                    "BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t1n,t1c,t2w,t2f,seg}.nii.gz (2023, 2024) or "
                    "BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz (2021); centers via --centers "
                    "FeTS partitioning_1.csv", _find("brats", "find_brats")),
    PublicConverter("atlas2", "ATLAS v2.0 stroke lesions (T1w)", "ATLAS2",
                    "ATLAS_2/Training/RNNN/sub-rNNNsMMM/ses-1/anat/sub-rNNNsMMM_ses-1_space-MNI152NLin2009aSym_"
                    "{T1w,label-L_desc-T1lesion_mask}.nii.gz; metadata *SupplementaryInfo.csv / *MetaData.xlsx",
                    _find("atlas2", "find_atlas2")),
    PublicConverter("mnms", "M&Ms-1 cardiac cine (LV, MYO, RV)", "MnMs",
                    "OpenDataset/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv and "
                    "OpenDataset/Training/Labeled/<ID>/<ID>_sa{,_gt}.nii.gz (4-D cine; ED and ES frames)",
                    _find("mnms", "find_mnms")),
    PublicConverter("mnms2", "M&Ms-2 cardiac (LV, MYO, RV)", "MnMs2",
                    "MnM2/dataset_information.csv and MnM2/dataset/NNN/NNN_SA_{ED,ES}{,_gt}.nii.gz",
                    _find("mnms", "find_mnms2")),
    PublicConverter("prostate_ms", "multi-site prostate T2 (6 sites)", "ProstateMS",
                    "ISBI/, ISBI_1.5/, I2CVB/, UCL/, BIDMC/, HK/ each with CaseNN.nii.gz and "
                    "CaseNN_segmentation.nii.gz (_Segmentation in ISBI_1.5)", _find("prostate_ms", "find_prostate_ms")),
    PublicConverter("ibsr18", "IBSR 18 brain tissue (CSF, GM, WM)", "IBSR18",
                    "IBSR_NN/IBSR_NN_{ana_strip,segTRI_fill_ana}.nii.gz (4-D, trailing singleton axis)",
                    _find("ibsr18", "find_ibsr18")),
)}

GENERATED = {
    "synthetic": "the embedded multi-center brain-lesion benchmark; nothing to download",
    "corrupt": "ATLAS-C style corrupted copies of an existing calibnet dataset (-d SOURCE --to TARGET)",
}


def convert_public(name: str, input_dir: Path, raw_root: Path, dataset_id: int, dataset_name: str | None = None,
                   overwrite: bool = False, progress: bool = True, **options) -> ConversionSummary:
    """Run converter ``name`` on ``input_dir`` and write dataset ``dataset_id`` under ``raw_root``."""
    converter = PUBLIC_CONVERTERS[name]
    found = converter.find(Path(input_dir), **options)
    return write_public_dataset(found, raw_root, dataset_id, dataset_name or converter.default_dataset_name,
                                overwrite=overwrite, progress=progress)

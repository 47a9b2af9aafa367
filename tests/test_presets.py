"""The presets under experiments/: every file is a valid calib_experiment grid (checked by calib_experiment
--dry-run on the tiny dataset, which stands in for the benchmark's id), lists the cells its header promises,
and states its expected CPU time."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from calibnet.cli import experiment as experiment_cli
from conftest import TINY_ID, run_cli

pytestmark = pytest.mark.slow

PRESETS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_the_papers_tables_are_shipped():
    names = {p.stem for p in PRESETS}
    assert {"calsam_table1", "calsam_table2", "calsam_table3", "calsam_loco", "confidence_table",
            "medsam_u_prompts", "safeclick_table2"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_grid_with_its_expected_time(preset, tiny_dataset, tmp_path):
    text = preset.read_text()
    assert re.search(r"(≈|~) ?\d+(\.\d+)? (min|h)", text), f"{preset.name} states no expected time"
    doc = yaml.safe_load(text)
    assert doc["dataset"] == 501
    local = tmp_path / preset.name
    local.write_text(text.replace("dataset: 501", f"dataset: {TINY_ID}"))
    os.environ.update({"nnUNet_raw": str(tiny_dataset.data_dir / "raw"),
                       "nnUNet_preprocessed": str(tiny_dataset.data_dir / "preprocessed"),
                       "nnUNet_results": str(tmp_path / "results")})
    output = run_cli(experiment_cli.main, [local, "--dry-run"]).output
    folds = 4 if doc["folds"] == "all" and doc["split"] == "loco" else len(doc["folds"])
    cells = len(doc["methods"]) * folds * len(doc.get("seeds", [42]))
    assert f"{cells} cells" in output
    for entry in doc["methods"]:
        alias = entry if isinstance(entry, str) else next(iter(entry))
        assert f"calib_train {TINY_ID} {doc['configuration']} {alias} " in output
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("*.pth"))

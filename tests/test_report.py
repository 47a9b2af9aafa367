"""The paper-facing outputs of calib_evaluate from hand-made per-case tables: per-seed mean ± std and bootstrap CIs,
the held-out-center main table, Holm correction and p formatting, the registry's baseline role, strict JSON,
tables.tex that escapes and compiles, distinct section titles, PDF figures."""
import itertools
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from calibnet.evaluation.evaluate import json_safe
from calibnet.evaluation.report import main_table, plot_all, reliability_panels, write_report
from calibnet.evaluation.tables import domain_generalisation_gap, format_p, holm, seed_summary, significance
from calibnet.metrics.calibration import calibration_bins


def _row(method, seed, case_id, role, dsc, fold=0, center="C1", vendor="Siemens", held_out="C1", **metrics):
    return {"method": method, "prompts": "none", "fold": fold, "seed": seed, "case_id": case_id, "role": role,
            "center": center, "vendor": vendor, "source_vendor": "", "held_out_center": held_out, "DSC": dsc, **metrics}


def test_mean_and_std_are_over_the_per_seed_means_and_the_ci_over_cases():
    values = {1: [0.2, 0.4, 0.3, 0.5], 2: [0.6, 0.8, 0.7, 0.9]}  # per-seed means 0.35 and 0.75
    table = pd.DataFrame([_row("nnunet", seed, f"c{i}", "target", v) for seed, vs in values.items()
                          for i, v in enumerate(vs)])
    summary = seed_summary(table, ["method"], ["DSC"]).iloc[0]
    assert summary["DSC mean"] == pytest.approx(0.55)
    assert summary["DSC std"] == pytest.approx(math.sqrt(2 * 0.2 ** 2))  # sample std of (0.35, 0.75): 0.283
    assert summary["DSC std"] != pytest.approx(np.std(values[1] + values[2], ddof=1))  # not the cases pooled: 0.214
    assert (summary["seeds"], summary["n"]) == (2, 4)
    per_case = np.array([0.4, 0.6, 0.5, 0.7])  # each case averaged over the two seeds
    expected = stats.bootstrap((per_case,), np.mean, method="percentile", rng=np.random.default_rng(0))
    assert (summary["DSC ci_low"], summary["DSC ci_high"]) == pytest.approx(
        (expected.confidence_interval.low, expected.confidence_interval.high))
    assert 0.4 <= summary["DSC ci_low"] < 0.55 < summary["DSC ci_high"] <= 0.7
    one_seed = seed_summary(table[table.seed == 1], ["method"], ["DSC"]).iloc[0]
    assert one_seed["DSC mean"] == pytest.approx(0.35) and math.isnan(one_seed["DSC std"])


def _loco_table():
    """Three held-out centers, C1 and C2 of the same vendor; source rows are the other centers' val cases."""
    centers = {"C1": "Siemens", "C2": "Siemens", "C3": "GE"}
    rows = []
    for fold, (held_out, vendor) in enumerate(centers.items()):
        for seed, shift in ((1, 0.0), (2, 0.1)):
            for case in range(2):
                rows.append(_row("nnunet", seed, f"{held_out}_{case}", "target", 0.3 + 0.2 * fold + shift, fold,
                                 held_out, vendor, held_out, ECE=0.1))
                other = next(c for c in centers if c != held_out)
                rows.append(_row("nnunet", seed, f"{other}_val{case}", "source", 0.9, fold, other, centers[other],
                                 held_out, ECE=0.05))
    return pd.DataFrame(rows)


def test_loco_main_table_has_one_row_per_held_out_center():
    table = main_table(_loco_table(), "loco")
    target = table[table.role == "target"]
    assert list(target["held_out_center"]) == ["C1", "C2", "C3"]  # C1 and C2 (both Siemens) are not merged
    assert "vendor" not in table.columns
    assert list(target["DSC"].str.split(" ").str[0]) == ["0.350", "0.550", "0.750"]  # per seed 0.3|0.4, 0.5|0.6, …
    assert list(target["DGG(DSC)"]) == ["0.550 ± 0.071", "0.350 ± 0.071", "0.150 ± 0.071"]  # per fold and seed
    assert len(table[table.role == "source"]) == 3
    # per-case tables without the column (written before it): each fold's target cases name its held-out center
    assert main_table(_loco_table().drop(columns="held_out_center"), "loco").equals(table)


def test_holm_matches_a_hand_computation():
    adjusted = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4) -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[4])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]).shape == (0,)


def test_p_values_are_printed_below_0_001_as_such():
    assert [format_p(p) for p in (0.0004, 1e-12, 0.001, 0.0123, 0.5, float("nan"))] == \
        ["<0.001", "<0.001", "0.001", "0.012", "0.500", "—"]


def test_the_baseline_is_the_best_method_the_registry_declares_a_baseline():
    rng = np.random.default_rng(0)
    rows = []
    for method, level in (("nnunet", 0.5), ("calsam", 0.9), ("sam_fip", 0.8), ("focal", 0.6), ("mytool", 0.55)):
        rows += [_row(method, 42, f"c{i}", "target", level + 0.05 * rng.standard_normal()) for i in range(10)]
    table = significance(pd.DataFrame(rows), ["DSC"])
    assert set(table["baseline"]) == {"focal"}  # calsam (proposed) and sam_fip (ablation) are better, not baselines
    assert set(table["method"]) == {"nnunet", "calsam", "sam_fip", "mytool"}
    assert list(table["t_test_p_holm"]) == pytest.approx(list(holm(table["t_test_p"])))
    assert (table["t_test_p_holm"] >= table["t_test_p"]).all()
    calsam = table[table.method == "calsam"].iloc[0]
    assert calsam["significant"] == "**" and calsam["over"] == "cases"


def _raise_on_constant(name):
    raise ValueError(f"{name} is not JSON")


def test_json_safe_gives_strict_json():
    value = {"a": float("nan"), "b": [np.float64(1.5), np.int64(3), float("inf")], "c": np.array([0.5, np.nan]),
             "d": {"e": -float("inf"), 7: "x"}}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text, parse_constant=_raise_on_constant) == {"a": None, "b": [1.5, 3, None], "c": [0.5, None],
                                                                    "d": {"e": None, "7": "x"}}


def _scanner_table():
    """Two seeds, two vendors as targets; methods whose names and columns hold underscores; two ablation families."""
    rng = np.random.default_rng(1)
    rows = []
    for method, seed, case in itertools.product(("nnunet", "unet_fip", "samft", "sam_fip", "calsam"), (42, 43),
                                                range(6)):
        role, vendor = ("source", "Siemens") if case < 2 else ("target", "GE" if case < 4 else "Philips")
        row = _row(method, seed, f"c_{case}", role, rng.uniform(0.5, 0.9), 0, f"C{case}", vendor, "",
                   HD95=rng.uniform(2, 9), ECE=rng.uniform(0, 0.01), ECE_boundary=rng.uniform(0, 0.2),
                   Brier=rng.uniform(0, 0.01))
        rows.append({**row, "source_vendor": "Siemens"})
    return pd.DataFrame(rows)


def test_tables_tex_escapes_and_compiles_and_report_titles_are_distinct(tmp_path):
    per_case = _scanner_table()
    tests = significance(per_case)
    write_report(tmp_path, "Dataset501_Synth_Brain", "scanner", per_case, domain_generalisation_gap(per_case)[1],
                 pd.DataFrame(), tests, ["a note"], [])
    latex = (tmp_path / "tables.tex").read_text()
    assert "unet\\_fip" in latex and "ECE\\_boundary" in latex and "Dataset501\\_Synth\\_Brain" in latex
    assert re.findall(r"(?<!\\)_", latex) == []
    assert "±" not in latex and "$\\pm$" in latex
    titles = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("#")]
    assert len(titles) == len(set(titles))
    assert sum(t.startswith("## Ablation") for t in titles) == 2
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: tables.tex was checked for escaping, not compiled")
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                        "\\input{tables.tex}\n\\end{document}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (tmp_path / "paper.pdf").read_bytes().startswith(b"%PDF")


def test_figures_are_written_as_png_and_pdf_with_a_reliability_column_per_target_domain(tmp_path):
    per_case = _scanner_table().assign(conf_mean_max_probability_foreground=lambda t: t["DSC"] + 0.01)
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.5, 1, 500)
    bins = calibration_bins(confidence, rng.uniform(0, 1, 500) < confidence)
    pooled = {(method, role, view, by, domain): bins for method in ("nnunet", "calsam") for view in ("ROI", "boundary")
              for role, by, domain in (("source", "all", "all"), ("target", "all", "all"), ("target", "vendor", "GE"),
                                       ("target", "vendor", "Philips"), ("target", "center", "C3"))}
    assert reliability_panels(pooled, "scanner") == [("source", "all", "all"), ("target", "vendor", "GE"),
                                                     ("target", "vendor", "Philips")]
    assert reliability_panels(pooled, "loco") == [("source", "all", "all"), ("target", "center", "C3")]
    written = plot_all(tmp_path, per_case, pooled, "scanner")
    assert [p.name for p in written] == ["reliability.png", "risk_coverage.png", "dsc_per_domain.png"]
    for png in written:
        assert png.read_bytes().startswith(b"\x89PNG")
        assert png.with_suffix(".pdf").read_bytes().startswith(b"%PDF")

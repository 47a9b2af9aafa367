"""report.md, tables.tex and the PNG plots of an evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calibnet.metrics.failure_detection import risk_coverage
from calibnet.evaluation.tables import COMPUTE_COLUMNS, LOWER_IS_BETTER, domain_columns

ABLATIONS = (("samft", "sam_fip", "sam_cmp", "calsam"), ("nnunet", "unet_fip", "unet_cmp", "calunet"),
             ("samft", "samft_focal", "samft_dicepp", "calsam"))  # CalSAM Table 3: baselines on SAM-FT


def _mean_std(table: pd.DataFrame, keys: list, metrics: list) -> pd.DataFrame:
    grouped = table.groupby(keys)[metrics]
    means, stds = grouped.mean(), grouped.std()
    out = means.copy().astype(object)
    for metric in metrics:
        out[metric] = [f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}" for m, s in zip(means[metric], stds[metric])]
    out["n"] = grouped.size()
    return out.reset_index()


def main_table(per_case: pd.DataFrame, dgg: pd.DataFrame, split: str) -> pd.DataFrame:
    """Table-1 style: DSC, HD95, ECE (ROI and boundary view) per method and domain (source rows, target rows)
    with DGG(DSC)."""
    metrics = [m for m in ("DSC", "HD95", "ECE", "ECE_boundary") if m in per_case]
    plain = per_case[~per_case["method"].str.contains(r" \+ ")]
    table = _mean_std(plain, ["method", "role", domain_columns(split)[-1]], metrics)
    if not dgg.empty and "DGG DSC mean" in dgg:
        gap = {r.method: f"{r['DGG DSC mean']:.3f} ± {r['DGG DSC std']:.3f}" if np.isfinite(r["DGG DSC std"])
               else f"{r['DGG DSC mean']:.3f}" for _, r in dgg.iterrows()}
        table["DGG(DSC)"] = table["method"].map(gap)
    return table


CALIBRATION_COLUMNS = ("ECE", "Brier", "ACE", "ECE_boundary", "Brier_boundary", "ACE_boundary")


def calibration_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """Table-3 style: ECE, Brier, ACE on the target cases in the ROI and boundary views, post-hoc rows
    included."""
    target = per_case[per_case["role"] == "target"]
    return _mean_std(target, ["method"], [m for m in CALIBRATION_COLUMNS if m in target])


def pooled_table(pooled: pd.DataFrame, split: str) -> pd.DataFrame:
    """Pooled ECE (all voxels of a domain) per method and domain, ROI and boundary views side by side."""
    by = "center" if split == "loco" else "vendor"
    chosen = pooled[pooled["by"].isin(["all", by])]
    if chosen.empty:
        return chosen
    table = chosen.pivot_table(index=["method", "role", "domain"], columns="view", values="pooled ECE").reset_index()
    table.columns.name = None
    return table.rename(columns={"ROI": "pooled ECE", "boundary": "pooled ECE_boundary"})


def _prompted_target_rows(per_case: pd.DataFrame, settings=None) -> pd.DataFrame:
    """Target rows of prompted methods (without post-hoc rows), limited to ``settings`` when given, with the
    " [SETTING]" suffix dropped from the method label (the prompts column holds it)."""
    if "prompts" not in per_case:
        return per_case[:0]
    chosen = per_case["prompts"].isin(settings) if settings is not None else per_case["prompts"] != "none"
    rows = per_case[chosen & (per_case["role"] == "target") & ~per_case["method"].str.contains(r" \+ ")]
    return rows.assign(method=rows["method"].str.replace(r" \[.*\]$", "", regex=True))


def prompt_quality_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """Table-I style (MedSAM-U): Dice, IoU and calibration of each prompted method under each prompt setting,
    on the target cases; empty unless some run was predicted with a prompt-quality setting."""
    prompted = _prompted_target_rows(per_case)
    if prompted["prompts"].nunique() < 2:
        return per_case[:0]
    return _mean_std(prompted, ["method", "prompts"], [m for m in ("DSC", "IoU", "ECE", "Brier") if m in prompted])


POINT_SETTINGS = ("P0", "P25", "P50", "P75", "P100")  # SafeClick Table 2: P0 perfect, the rest imperfect
BOX_SETTINGS = ("B100", "B50", "B75", "B125", "B150")  # B100 perfect


def prompt_robustness_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """SafeClick Table-2 style: mean target DSC of each prompted method under perfect (P0, B100) and imperfect
    point/box prompts, Avg. over the imperfect settings present, and the same average of ECE and Brier;
    empty unless some method was predicted with two or more of these settings."""
    chosen = _prompted_target_rows(per_case, POINT_SETTINGS + BOX_SETTINGS)
    if chosen.empty or chosen.groupby("method")["prompts"].nunique().max() < 2:
        return per_case[:0]
    means = chosen.groupby(["method", "prompts"])[[m for m in ("DSC", "ECE", "Brier") if m in chosen]].mean()
    rows = []
    for method in sorted(chosen["method"].unique()):
        row = {"method": method}
        for kind, settings in (("points", POINT_SETTINGS), ("boxes", BOX_SETTINGS)):
            present = [s for s in settings if (method, s) in means.index]
            for setting in present:
                row[f"DSC {setting}"] = means.loc[(method, setting), "DSC"]
            imperfect = [s for s in present if s != settings[0]]
            if imperfect:
                for metric in means.columns:
                    row[f"{metric} Avg. IP {kind}"] = float(np.mean([means.loc[(method, s), metric] for s in imperfect]))
        rows.append(row)
    table = pd.DataFrame(rows)
    order = ["method"] + [f"DSC {s}" for s in POINT_SETTINGS] + ["DSC Avg. IP points"] + \
        [f"DSC {s}" for s in BOX_SETTINGS] + ["DSC Avg. IP boxes"] + \
        [f"{m} Avg. IP {k}" for m in ("ECE", "Brier") for k in ("points", "boxes")]
    return table[[c for c in order if c in table]]


def ablation_tables(per_case: pd.DataFrame) -> list:
    """One target-case table per ablation family with at least two of its methods present (a family whose
    present methods an earlier table already shows, all of them, is not repeated)."""
    tables, shown = [], []
    for family in ABLATIONS:
        present = [m for m in family if m in set(per_case["method"])]
        if len(present) >= 2 and not any(set(present) <= earlier for earlier in shown):
            shown.append(set(present))
            subset = per_case[per_case["method"].isin(present)]
            table = _mean_std(subset[subset.role == "target"], ["method"],
                              [m for m in ("DSC", "HD95", "ECE") if m in subset])
            table["order"] = table["method"].map(family.index)
            tables.append(table.sort_values("order").drop(columns="order"))
    return tables


def _markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".3f") if not table.empty else "_(nothing to show)_"


def compute_section(compute: pd.DataFrame | None, evaluation_seconds: float | None) -> list:
    """The report's "Compute time (seconds)" lines: the table of ``tables.compute_time`` with one decimal and
    "—" where no run of the row recorded the step, and the evaluation's own seconds in the caption (no lines
    without a table)."""
    if compute is None:
        return []
    shown = compute.astype(object)
    for column in COMPUTE_COLUMNS:
        shown[column] = [f"{v:.1f}" if np.isfinite(v) else "—" for v in compute[column].astype(float)]
    if compute["prompt settings s"].isna().all():  # no run was predicted with a prompt-quality setting
        shown = shown.drop(columns="prompt settings s")
    took = "" if evaluation_seconds is None else \
        f" This evaluation (calib_evaluate up to writing this report): {evaluation_seconds:.1f} s."
    return ["## Compute time (seconds)", "",
            "Wall-clock seconds from each run's calibnet_run.json, mean over the runs of the row that recorded "
            "them (`timed` of `runs`; — = none did, e.g. runs trained before seconds were kept). prediction = val + "
            "test with the run's own prompts; prompt settings (shown when there are any) = all its prompt-quality "
            "prediction sets together; `+ confidence_head` rows: the head's training and its scoring of the base "
            "run's predictions." + took,
            "", shown.to_markdown(index=False, colalign=("left",) + ("right",) * (shown.shape[1] - 1),
                                  disable_numparse=True) if not shown.empty else "_(nothing to show)_", ""]


def write_report(folder: Path, dataset: str, split: str, per_case: pd.DataFrame, dgg: pd.DataFrame,
                 failure: pd.DataFrame, significance: pd.DataFrame, notes: list, plots: list,
                 pooled: pd.DataFrame | None = None, compute: pd.DataFrame | None = None, seconds=None) -> str:
    """Write report.md and tables.tex (and prompt_robustness.csv when there is that table); returns the
    Markdown. ``compute`` (``tables.compute_time``) and ``seconds`` (the evaluation's) make the compute section."""
    main = main_table(per_case, dgg, split)
    calibration = calibration_table(per_case)
    ablations = ablation_tables(per_case)
    lines = [f"# calibnet evaluation: {dataset}, {split} split", ""]
    lines += [f"> note: {n}" for n in notes] + ([""] if notes else [])
    lines += ["Source = in-domain validation cases of each fold, target = the held-out domain. Mean ± std over cases. "
              f"Lower is better for {', '.join(LOWER_IS_BETTER)}; DGG = source − target (for DSC, positive = "
              "worse on the target). Calibration on the predicted class confidence, 15 bins, in two views: ROI = "
              "non-zero input voxels (columns without suffix) and boundary = within 5 mm of ground truth ∪ "
              "prediction (`_boundary`), where easy background cannot drown the differences. SAM methods are "
              "prompted from the ground truth.", "",
              "## Accuracy, boundary error and calibration per domain", "", _markdown(main), ""]
    for table in ablations:
        lines += ["## Ablation (target cases)", "", _markdown(table), ""]
    prompt_quality = prompt_quality_table(per_case)
    if not prompt_quality.empty:
        lines += ["## Prompt quality (target cases)", "",
                  "Each prompted method under each prompt-quality setting (docs/prompt_quality.md): kP random "
                  "foreground points, kB(r) boxes at IoU r with the ground-truth box (several boxes: one prediction "
                  "per box, probabilities averaged), P<d> one point displaced by d % of the object radius, B<s> the "
                  "ground-truth box scaled to s %; `default` = centroid + background point, `B100` = the exact box.",
                  "", _markdown(prompt_quality), ""]
    robustness = prompt_robustness_table(per_case)
    if not robustness.empty:
        robustness.to_csv(folder / "prompt_robustness.csv", index=False)
        lines += ["## Robustness to imperfect prompts (target cases; SafeClick Table 2 layout)", "",
                  "Mean DSC per setting: P0 = one point at the centre of mass (perfect), P25–P100 = displaced by "
                  "25–100 % of the object radius; B100 = the ground-truth box (perfect), B50–B150 = scaled to "
                  "50–150 %. Avg. IP = mean over the imperfect settings shown; ECE and Brier averaged the same way.",
                  "", _markdown(robustness), ""]
    lines += ["## Calibration with post-hoc rows (target cases)", "",
              "`+ TS`: temperature scaling, `+ Dirichlet`: Dirichlet calibration, both fitted on the source "
              "validation voxels of the same run.", "", _markdown(calibration), ""]
    if pooled is not None and not pooled.empty:
        lines += ["## Pooled calibration (all voxels of a domain)", "",
                  "ECE of every voxel of the domain's cases together (equal-width bins merged exactly); `all` = "
                  "every case of the role.", "", _markdown(pooled_table(pooled, split)), ""]
    lines += ["## Failure detection (target cases; risk = 1 − quality: DSC, or NSD@1mm for NSD scores; "
              "AURC/eAURC on a 0–1 scale)", "",
              "`direction`: ↑ a confidence (higher = more likely right), ↓ an uncertainty (higher = more likely "
              "wrong), negated before ranking, so Pearson r is that of the oriented score for both (positive = "
              "good). Tied scores share the mean risk of their block.", "",
              _markdown(failure[failure["domain"] == "pooled"] if not failure.empty else failure), ""]
    lines += ["## Significance against the strongest baseline (** p < 0.01, * p < 0.05, paired t-test)", "",
              _markdown(significance), ""] + compute_section(compute, seconds)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    latex = [main.to_latex(index=False, caption=f"{dataset}, {split}: per-domain results", label="tab:main"),
             calibration.to_latex(index=False, caption="Calibration (target)", label="tab:calibration")]
    if not failure.empty:
        latex.append(failure[failure["domain"] == "pooled"].to_latex(index=False, float_format="%.3f",
                                                                     caption="Failure detection", label="tab:fd"))
    (folder / "tables.tex").write_text("\n\n".join(latex))
    return text


def plot_all(folder: Path, per_case: pd.DataFrame, pooled_bins: dict, split: str) -> list:
    """Reliability diagrams (per method and role), risk–coverage curves, DSC per domain box plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = sorted({label for label, _, _ in pooled_bins})
    views = [v for v in ("ROI", "boundary") if any(view == v for _, _, view in pooled_bins)]
    if methods:
        fig, axes = plt.subplots(len(views), len(methods), figsize=(3.2 * len(methods), 3.2 * len(views)),
                                 squeeze=False)
        for row, view in enumerate(views):
            for ax, method in zip(axes[row], methods):
                ax.plot([0, 1], [0, 1], "k--", lw=0.8)
                for (label, role, v), bins in sorted(pooled_bins.items()):
                    if label != method or v != view:
                        continue
                    used = bins.count > 0
                    ax.plot(bins.confidence[used], bins.accuracy[used], "o-", ms=3,
                            label=f"{role} (ECE {bins.expected_calibration_error():.3f})")
                ax.set_title(f"{method} ({view})", fontsize=9)
                ax.set_xlabel("confidence")
                ax.set_ylabel("accuracy")
                ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "reliability.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    target = per_case[(per_case.role == "target") & per_case["DSC"].notna()] if "DSC" in per_case else per_case[:0]
    score = "conf_mean_max_probability_foreground"
    if score in target and target[score].notna().any():
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for method, group in target.groupby("method"):
            coverage, risk = risk_coverage(group[score].values, 1 - group["DSC"].values)
            ax.plot(coverage, risk, label=method)
        ax.set_xlabel("coverage")
        ax.set_ylabel("risk (1 − DSC) of the covered cases")
        ax.set_title("risk–coverage, mean max-probability score", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "risk_coverage.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if not target.empty:
        domain = domain_columns(split)[-1 if split == "scanner" else 0]
        fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * target["method"].nunique() * target[domain].nunique()), 3.5))
        labels, data = [], []
        for (method, name), group in target.groupby(["method", domain]):
            labels.append(f"{method}\n{name}")
            data.append(group["DSC"].values)
        ax.boxplot(data)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.set_ylabel("DSC (target cases)")
        fig.tight_layout()
        written.append(folder / "dsc_per_domain.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written

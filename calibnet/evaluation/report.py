"""report.md, tables.tex and the PNG plots of an evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calibnet.metrics.failure_detection import risk_coverage
from calibnet.evaluation.tables import (COMPUTE_COLUMNS, LOWER_IS_BETTER, domain_columns, format_p,
                                        held_out_columns, seed_summary)

ABLATIONS = (("samft", "sam_fip", "sam_cmp", "calsam"), ("nnunet", "unet_fip", "unet_cmp", "calunet"),
             ("samft", "samft_focal", "samft_dicepp", "calsam"))  # CalSAM Table 3: baselines on SAM-FT
SUMMARY_PARTS = ("mean", "std", "ci_low", "ci_high")


def _cell(mean: float, std: float, low: float, high: float) -> str:
    """"mean ± std [low, high]": ± only with a std over seeds, the CI only where there is one."""
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else "") + \
        (f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) else "")


def _mean_std(table: pd.DataFrame, keys: list, metrics: list) -> pd.DataFrame:
    """One row per group of ``keys``: each metric as "mean ± std [95 % CI]" (:func:`tables.seed_summary`: std over
    the per-seed means, bootstrap CI over cases), then seeds and n (cases)."""
    summary = seed_summary(table, keys, metrics)
    if summary.empty:
        return pd.DataFrame(columns=[*keys, *metrics, "seeds", "n"])
    out = summary[keys].copy()
    for metric in metrics:
        out[metric] = [_cell(*values) for values in zip(*(summary[f"{metric} {s}"] for s in SUMMARY_PARTS))]
    if "ECE" in metrics:  # the ROI view is never empty: no ECE at all means predictions without probabilities
        without = summary["ECE mean"].isna().to_numpy()
        for metric in (m for m in metrics if m.startswith(("ECE", "ACE", "Brier"))):
            out.loc[without, metric] = "no probabilities"
    return out.assign(seeds=summary["seeds"], n=summary["n"])


def _fold_gap(plain: pd.DataFrame, key: str) -> dict:
    """(method, held-out domain of the fold) -> DGG(DSC) as "mean ± std" over seeds: per seed the mean over the
    fold's source cases − the mean over its target cases (DESIGN §7), computed per seed first."""
    if "DSC" not in plain:
        return {}
    means = plain.groupby(["method", key, "seed", "role"])["DSC"].mean().unstack("role")
    if not {"source", "target"} <= set(means.columns):
        return {}
    gaps = {}
    for (method, domain), values in (means["source"] - means["target"]).dropna().groupby(level=[0, 1]):
        gaps[(method, domain)] = f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")
    return gaps


def main_table(per_case: pd.DataFrame, split: str) -> pd.DataFrame:
    """Table-1 style: DSC, HD95, ECE (ROI and boundary view) per method, role and held-out domain: one row per
    held-out center (loco) or per source → target vendor (scanner), with DGG(DSC) of the row's fold."""
    metrics = [m for m in ("DSC", "HD95", "ECE", "ECE_boundary") if m in per_case]
    plain = per_case[~per_case["method"].str.contains(r" \+ ")]
    domains = held_out_columns(split)
    if split == "loco" and "held_out_center" not in plain:
        # a per_case.csv from before the column: a loco fold's target cases are all of its held-out center
        held_out = plain[plain["role"] == "target"].groupby("fold")["center"].first()
        plain = plain.assign(held_out_center=plain["fold"].map(held_out))
    table = _mean_std(plain, ["method", "role", *domains], metrics)
    gaps = _fold_gap(plain, domains[0])
    if gaps:
        table["DGG(DSC)"] = [gaps.get(key, "—") for key in zip(table["method"], table[domains[0]])]
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


def dgg_table(dgg: pd.DataFrame) -> pd.DataFrame:
    """DGG of DSC, HD95 and ECE (both views) per method as "mean ± std" over the method's folds and seeds."""
    metrics = [m for m in ("DSC", "HD95", "ECE", "ECE_boundary") if f"DGG {m} mean" in dgg]
    out = dgg[["method"]].copy() if not dgg.empty else pd.DataFrame(columns=["method"])
    for metric in metrics:
        out[f"DGG {metric}"] = [_cell(m, s, np.nan, np.nan) for m, s in zip(dgg[f"DGG {metric} mean"],
                                                                        dgg[f"DGG {metric} std"])]
    return out


def significance_shown(significance: pd.DataFrame) -> pd.DataFrame:
    """The significance table as printed: means with three decimals, every p-value by :func:`tables.format_p`."""
    shown = significance.astype(object)
    for column in ("mean", "baseline_mean"):
        shown[column] = [f"{v:.3f}" if np.isfinite(v) else "—" for v in significance[column].astype(float)]
    for column in (c for c in significance.columns if c.endswith(("_p", "_p_holm"))):
        shown[column] = [format_p(p) for p in significance[column].astype(float)]
    return shown


def _intro(dataset: str, split: str, notes: list) -> list:
    held_out = "the held-out center" if split == "loco" else "source → target vendor"
    return [f"# calibnet evaluation: {dataset}, {split} split", ""] + \
        [f"> note: {n}" for n in notes] + ([""] if notes else []) + \
        ["Source = in-domain validation cases of each fold, target = the held-out domain. Each cell: mean ± std over "
         "seeds (the mean over each seed's cases first, then mean and std of those per-seed means; no ± with one "
         "seed) [bootstrap 95 % CI of the mean over cases, each case averaged over seeds; percentile, "
         "scipy.stats.bootstrap]; n = cases, seeds = seeds. "
         f"Lower is better for {', '.join(LOWER_IS_BETTER)}; DGG = source − target (for DSC, positive = "
         "worse on the target). Calibration on the predicted class confidence, 15 bins, in two views: ROI = "
         "non-zero input voxels (columns without suffix) and boundary = within 5 mm of ground truth ∪ "
         "prediction (`_boundary`), where easy background cannot drown the differences. SAM methods are "
         "prompted from the ground truth.", "",
         f"## Accuracy, boundary error and calibration per held-out domain ({held_out})", ""]


def _prompt_sections(folder: Path, per_case: pd.DataFrame) -> list:
    """The prompt-quality and robustness sections (and prompt_robustness.csv), where there are such predictions."""
    lines = []
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
    return lines


def _analysis_sections(split: str, calibration: pd.DataFrame, pooled, failure: pd.DataFrame,
                       significance: pd.DataFrame) -> list:
    """Calibration, pooled calibration, failure detection and significance sections."""
    lines = ["## Calibration with post-hoc rows (target cases)", "",
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
    lines += ["## Significance against the strongest baseline (paired t-test and Wilcoxon, Holm-adjusted)", "",
              "The baseline is the best target mean among the methods the registry declares as baselines "
              "(calibnet/methods.py `compared_as`); proposed methods and their ablations are never the baseline. "
              "`*_holm`: Holm-adjusted over every comparison of this table; `significant`: ** p < 0.01, * p < 0.05 "
              "of the adjusted t-test p.", "", _markdown(significance_shown(significance)), ""]
    return lines


def write_report(folder: Path, dataset: str, split: str, per_case: pd.DataFrame, dgg: pd.DataFrame,
                 failure: pd.DataFrame, significance: pd.DataFrame, notes: list, plots: list,
                 pooled: pd.DataFrame | None = None, compute: pd.DataFrame | None = None, seconds=None) -> str:
    """Write report.md and tables.tex (and prompt_robustness.csv when there is that table); returns the
    Markdown. ``compute`` (``tables.compute_time``) and ``seconds`` (the evaluation's) make the compute section."""
    main = main_table(per_case, split)
    calibration = calibration_table(per_case)
    lines = _intro(dataset, split, notes) + [_markdown(main), ""]
    if not dgg.empty:
        lines += ["## Domain generalisation gap (mean ± std over folds and seeds)", "",
                  "Per run: mean over its source cases − mean over its target cases; lower is better for HD95 and "
                  "ECE, so their gap is usually negative.", "", _markdown(dgg_table(dgg)), ""]
    for table in ablation_tables(per_case):
        lines += [f"## Ablation: {' vs '.join(table['method'])} (target cases)", "", _markdown(table), ""]
    lines += _prompt_sections(folder, per_case)
    lines += _analysis_sections(split, calibration, pooled, failure, significance)
    lines += compute_section(compute, seconds)
    lines += ["## Plots", "", "Each figure is also written as a vector PDF beside the PNG (same name, `.pdf`).", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    tables = [(main, f"{dataset}, {split}: per-domain results", "tab:main"),
              (calibration, "Calibration (target)", "tab:calibration"),
              (significance_shown(significance), "Significance against the strongest baseline", "tab:significance")]
    if not failure.empty:
        tables.insert(2, (failure[failure["domain"] == "pooled"], "Failure detection", "tab:fd"))
    (folder / "tables.tex").write_text(latex_tables(tables))
    return text


# text that pdflatex cannot typeset as it is (after pandas' escaping of LaTeX's special characters): < and > are
# other glyphs in the default OT1 font encoding; the Unicode symbols are not defined for inputenc
LATEX_SYMBOLS = str.maketrans({"±": r"$\pm$", "−": "$-$", "–": "--", "—": "---", "↑": r"$\uparrow$",
                               "↓": r"$\downarrow$", "<": "$<$", ">": "$>$", "∪": r"$\cup$", "→": r"$\to$"})
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_text(text: str) -> str:
    """Plain text (a caption) escaped for LaTeX, as pandas' ``to_latex(escape=True)`` escapes cells."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def latex_tables(tables: list) -> str:
    """tables.tex: each (table, caption, label) as a booktabs table, cells, headers and captions escaped."""
    blocks = ["% calibnet evaluation tables: \\usepackage{booktabs} in the preamble, then \\input{tables.tex}; wide "
              "tables fit a page in \\resizebox{\\textwidth}{!}{...} (graphicx) or on a landscape page"]
    for table, caption, label in tables:
        blocks.append(table.to_latex(index=False, escape=True, float_format="%.3f", na_rep="---",
                                     caption=latex_text(caption), label=label))
    return "\n\n".join(blocks).translate(LATEX_SYMBOLS)


def _save(fig, folder: Path, stem: str) -> Path:
    """The figure as ``stem.png`` and as vector ``stem.pdf`` (no creation date, so reruns give the same file);
    returns the PNG's path."""
    fig.tight_layout()
    fig.savefig(folder / f"{stem}.png", dpi=100)
    fig.savefig(folder / f"{stem}.pdf", metadata={"CreationDate": None})
    return folder / f"{stem}.png"


def reliability_panels(pooled_bins: dict, split: str) -> list:
    """(role, by, domain) of each column of the reliability figure: the source cases together, then each target
    domain (center for loco, vendor for scanner)."""
    by = "center" if split == "loco" else "vendor"
    targets = sorted({domain for (_, role, _, b, domain) in pooled_bins if role == "target" and b == by})
    return ([("source", "all", "all")] if any(role == "source" for _, role, _, _, _ in pooled_bins) else []) + \
        [("target", by, domain) for domain in targets]


def _reliability_figure(plt, pooled_bins: dict, split: str):
    """Reliability curves per view (rows) and domain (columns), every method in each panel, with the bin counts
    (log scale) under each panel."""
    panels = reliability_panels(pooled_bins, split)
    views = [v for v in ("ROI", "boundary") if any(key[2] == v for key in pooled_bins)]
    methods = sorted({key[0] for key in pooled_bins})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(2 * len(views), len(panels), figsize=(3.4 * len(panels), 4.4 * len(views)),
                             squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1] * len(views)})
    for row, view in enumerate(views):
        for column, (role, by, domain) in enumerate(panels):
            curve, counts = axes[2 * row, column], axes[2 * row + 1, column]
            curve.plot([0, 1], [0, 1], "k--", lw=0.8)
            for method in methods:
                bins = pooled_bins.get((method, role, view, by, domain))
                if bins is None:
                    continue
                used = bins.count > 0
                curve.plot(bins.confidence[used], bins.accuracy[used], "o-", ms=3, color=colours[method],
                           label=f"{method} (ECE {bins.expected_calibration_error():.3f})")
                counts.stairs(bins.count, bins.edges, color=colours[method])
            curve.set_title(f"{role} {domain} ({view})" if role == "target" else f"source, all cases ({view})",
                            fontsize=9)
            curve.set_ylabel("accuracy")
            curve.legend(fontsize=6)
            curve.set_xlim(0, 1)
            counts.set_yscale("log")
            counts.set_xlabel("confidence")
            counts.tick_params(labelbottom=True)  # shared x hides them on every row but the last
            counts.set_ylabel("voxels", fontsize=8)
    return fig


def plot_all(folder: Path, per_case: pd.DataFrame, pooled_bins: dict, split: str) -> list:
    """Reliability diagrams per target domain with their bin counts (``pooled_bins``: (method, role, view, by,
    domain) -> pooled CalibrationBins, as ``evaluate.pooled_calibration`` returns them), risk–coverage curves, DSC
    per domain box plot; each as PNG and PDF. Returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if pooled_bins:
        fig = _reliability_figure(plt, pooled_bins, split)
        written.append(_save(fig, folder, "reliability"))
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
        written.append(_save(fig, folder, "risk_coverage"))
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
        written.append(_save(fig, folder, "dsc_per_domain"))
        plt.close(fig)
    return written

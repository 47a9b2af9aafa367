"""Aggregations of the per-case table: per domain, domain generalisation gap, failure detection,
significance. Every function takes and returns pandas DataFrames."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from calibnet.evaluation.failure_detection import failure_detection_metrics

LOWER_IS_BETTER = ("HD95", "ECE", "ACE", "Brier")
PROPOSED = ("calsam", "calunet", "sam_fip", "sam_cmp", "unet_fip", "unet_cmp")


def metric_columns(table: pd.DataFrame) -> list:
    names = ("DSC", "IoU", "HD95", "NSD@", "ECE", "ACE", "Brier")
    return [c for c in table.columns if c.startswith(names)]


def domain_columns(split: str) -> list:
    """Columns that name a row's domain: the center (loco), or source → target vendor (scanner)."""
    return ["center", "vendor"] if split == "loco" else ["source_vendor", "vendor"]


def per_domain(per_case: pd.DataFrame, split: str) -> pd.DataFrame:
    """mean, std and n of every metric per method, role and domain (plus condition when present)."""
    keys = ["method"] + (["prompts"] if "prompts" in per_case else []) + ["role"] + domain_columns(split) + \
        (["condition"] if "condition" in per_case else [])
    metrics = metric_columns(per_case)
    grouped = per_case.groupby(keys, dropna=False)[metrics]
    table = grouped.agg(["mean", "std"])
    table.columns = [f"{m} {s}" for m, s in table.columns]
    table["n"] = grouped.size()
    return table.reset_index()


def domain_generalisation_gap(per_case: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DGG = mean over source val cases − mean over target test cases, per method/fold/seed, then averaged
    over folds and seeds (mean ± std). For metrics where lower is better the sign is kept as defined."""
    metrics = [m for m in metric_columns(per_case) if per_case[m].notna().any()]
    means = per_case.groupby(["method", "fold", "seed", "role"])[metrics].mean()
    rows = []
    for (method, fold, seed), group in means.groupby(level=[0, 1, 2]):
        roles = group.droplevel([0, 1, 2])
        if {"source", "target"} <= set(roles.index):
            rows.append({"method": method, "fold": fold, "seed": seed,
                         **(roles.loc["source"] - roles.loc["target"]).to_dict()})
    per_run = pd.DataFrame(rows)
    if per_run.empty:
        return per_run, per_run
    summary = per_run.groupby("method")[metrics].agg(["mean", "std"])
    summary.columns = [f"DGG {m} {s}" for m, s in summary.columns]
    return per_run, summary.reset_index()


NOT_SCORES = ("conf_mc_samples", "conf_predicted_foreground_voxels")  # counts, not confidence scores


def _quality(per_case: pd.DataFrame, metric: str) -> pd.Series:
    """Per-case DSC or NSD@1mm: the column itself for one foreground label, else the mean over labels."""
    name = {"DSC": "DSC", "NSD": "NSD@1mm"}[metric]
    if name in per_case:
        return per_case[name]
    columns = [c for c in per_case.columns if c.startswith(f"{name}_")]
    return per_case[columns].mean(axis=1) if columns else pd.Series(np.nan, index=per_case.index)


def failure_detection(per_case: pd.DataFrame, split: str) -> pd.DataFrame:
    """Pearson r, AURC, eAURC (risk = 1 − quality, 0–1 scale) and MAE (scores that predict the quality) of
    every confidence score on the target cases, pooled and per target domain. The quality is DSC, except for
    NSD scores (predicted NSD, NSD score agreement), which are held to the case's NSD@1mm."""
    target = per_case[per_case["role"] == "target"].assign(quality_DSC=lambda t: _quality(t, "DSC"),
                                                           quality_NSD=lambda t: _quality(t, "NSD"))
    scores = [c for c in per_case.columns if c.startswith("conf_") and c not in NOT_SCORES
              and pd.api.types.is_numeric_dtype(per_case[c]) and per_case[c].nunique() > 1]
    domain = domain_columns(split)[-1 if split == "scanner" else 0]
    rows = []
    for method, group in target.groupby("method"):
        for score in scores:
            name = score[len("conf_"):]
            quality = "NSD" if "nsd" in name.lower() else "DSC"
            valid = group[group[score].notna() & group[f"quality_{quality}"].notna()]
            if len(valid) < 2:
                continue
            subsets = [("pooled", valid)] + [(str(d), g) for d, g in valid.groupby(domain)]
            for domain_name, subset in subsets:
                if len(subset) >= 2:
                    rows.append({"method": method, "score": name, "quality": quality, "domain": domain_name,
                                 **failure_detection_metrics(subset[score], subset[f"quality_{quality}"],
                                                             "_predicted_" in f"_{name}")})
    return pd.DataFrame(rows)


def stars(p: float) -> str:
    """The papers' convention: * p < 0.05."""
    return "*" if np.isfinite(p) and p < 0.05 else ""


def significance(per_case: pd.DataFrame, metrics=("DSC", "ECE")) -> pd.DataFrame:
    """Paired t-test and Wilcoxon of each method against the strongest baseline on the target cases: over
    seeds (means per seed) when at least two seeds are shared, else over cases."""
    target = per_case[(per_case["role"] == "target") & ~per_case["method"].str.contains(r" \+ ")]
    methods = sorted(target["method"].unique())
    baselines = [m for m in methods if m not in PROPOSED] or methods
    rows = []
    for metric in metrics:
        if metric not in target or target[metric].isna().all():
            continue
        means = target.groupby("method")[metric].mean()
        better_low = metric in LOWER_IS_BETTER
        baseline = (means[baselines].idxmin() if better_low else means[baselines].idxmax())
        for method in methods:
            if method == baseline:
                continue
            a, b = target[target.method == method], target[target.method == baseline]
            shared_seeds = sorted(set(a.seed) & set(b.seed))
            if len(shared_seeds) >= 2:
                x = a.groupby("seed")[metric].mean()[shared_seeds].values
                y = b.groupby("seed")[metric].mean()[shared_seeds].values
                over = "seeds"
            else:
                paired = a.merge(b, on=["case_id", "fold", "seed"], suffixes=("", "_baseline"))
                x, y, over = paired[metric].values, paired[f"{metric}_baseline"].values, "cases"
            t_p = float(stats.ttest_rel(x, y).pvalue) if len(x) >= 2 and np.any(x != y) else float("nan")
            try:
                w_p = float(stats.wilcoxon(x, y).pvalue) if len(x) >= 2 and np.any(x != y) else float("nan")
            except ValueError:
                w_p = float("nan")
            rows.append({"metric": metric, "method": method, "baseline": baseline, "over": over, "n": len(x),
                         "mean": float(np.mean(x)), "baseline_mean": float(np.mean(y)),
                         "t_test_p": t_p, "wilcoxon_p": w_p, "significant": stars(t_p)})
    return pd.DataFrame(rows)

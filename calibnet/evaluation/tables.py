"""Aggregations of the per-case table: per domain, domain generalisation gap, failure detection,
significance. Every function takes and returns pandas DataFrames."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from calibnet.evaluation.external import EXTERNAL_SEED
from calibnet.methods import METHODS
from calibnet.metrics.failure_detection import failure_detection_metrics
from calibnet.metrics.confidence_scores import as_confidence, score_kind

LOWER_IS_BETTER = ("HD95", "ECE", "ACE", "Brier")
BOOTSTRAP_RESAMPLES = 9999


def metric_columns(table: pd.DataFrame) -> list:
    names = ("DSC", "IoU", "HD95", "NSD@", "ECE", "ACE", "Brier")
    return [c for c in table.columns if c.startswith(names)]


def domain_columns(split: str) -> list:
    """Columns that name a row's domain: the center (loco), or source → target vendor (scanner)."""
    return ["center", "vendor"] if split == "loco" else ["source_vendor", "vendor"]


def held_out_columns(split: str) -> list:
    """Columns that name the held-out domain of a row's fold, one value per fold: the held-out center (loco), or
    the source vendor and the row's vendor (scanner: the source rows, then one row per target vendor)."""
    return ["held_out_center"] if split == "loco" else ["source_vendor", "vendor"]


def _bootstrap_ci(values: np.ndarray) -> tuple[float, float]:
    """Percentile bootstrap 95 % CI of the mean (scipy.stats.bootstrap, fixed seed); NaN with fewer than 2 values."""
    if len(values) < 2:
        return np.nan, np.nan
    if np.all(values == values[0]):
        return float(values[0]), float(values[0])
    result = stats.bootstrap((values,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                             rng=np.random.default_rng(0))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def seed_summary(table: pd.DataFrame, keys: list, metrics: list) -> pd.DataFrame:
    """Per group of ``keys`` and metric: ``M mean`` and ``M std`` over seeds of the per-seed means (each seed's
    mean over its cases first, so cases are never pooled across seeds; std NaN with one seed) and ``M ci_low``,
    ``M ci_high``: a bootstrap 95 % CI of the mean over cases (a case = fold and case_id, its values averaged over
    seeds). ``seeds`` and ``n`` (cases) per group. Rows without a seed column count as one seed."""
    table = table.assign(seed=table["seed"] if "seed" in table else 0)
    units = [c for c in ("fold", "case_id") if c in table] or None
    rows = []
    for key, group in table.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        per_seed = group.groupby("seed")[metrics].mean()
        per_case = group.groupby(units)[metrics].mean() if units else group[metrics]
        for metric in metrics:
            low, high = _bootstrap_ci(per_case[metric].dropna().to_numpy(dtype=float))
            row.update({f"{metric} mean": per_seed[metric].mean(), f"{metric} std": per_seed[metric].std(),
                        f"{metric} ci_low": low, f"{metric} ci_high": high})
        rows.append({**row, "seeds": group["seed"].nunique(), "n": len(per_case)})
    return pd.DataFrame(rows)


def per_domain(per_case: pd.DataFrame, split: str) -> pd.DataFrame:
    """mean, std and n of every metric per method, role and domain (plus condition when present)."""
    keys = ["method"] + [c for c in ("configuration", "prompts") if c in per_case] + ["role"] + domain_columns(split) + \
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


def _quality(per_case: pd.DataFrame, metric: str) -> pd.Series:
    """Per-case DSC or NSD@1mm: the column itself for one foreground label, else the mean over labels."""
    name = {"DSC": "DSC", "NSD": "NSD@1mm"}[metric]
    if name in per_case:
        return per_case[name]
    columns = [c for c in per_case.columns if c.startswith(f"{name}_")]
    return per_case[columns].mean(axis=1) if columns else pd.Series(np.nan, index=per_case.index)


def ranked_scores(per_case: pd.DataFrame) -> tuple[list, list]:
    """(ranked, unranked) ``conf_*`` score names of a per-case table: ranked are the declared confidences and
    uncertainties (calibnet.metrics.confidence_scores) that vary; unranked the rest with a reason each."""
    ranked, unranked = [], []
    for column in (c for c in per_case.columns if c.startswith("conf_")):
        name = column[len("conf_"):]
        kind = score_kind(name)
        if not pd.api.types.is_numeric_dtype(per_case[column]):
            continue  # per-slice lists and other non-scalar entries
        if kind is None:
            unranked.append(f"{name} (direction not declared)")
        elif not kind.ranked:
            unranked.append(f"{name} (not a confidence score)")
        else:
            ranked.append(name)
    return ranked, unranked


def failure_detection(per_case: pd.DataFrame, split: str) -> pd.DataFrame:
    """Pearson r, AURC, eAURC (risk = 1 − quality, 0–1 scale) and MAE (scores that predict the quality) of
    every declared confidence score on the target cases, pooled and per target domain. Uncertainties are
    negated before ranking, so Pearson r is that of the oriented score (positive = higher confidence goes with
    better quality) for both kinds; ``direction`` says which kind a score is. The quality is DSC (the mean over
    labels for several), except for NSD scores (predicted NSD, NSD score agreement), held to NSD@1mm."""
    target = per_case[per_case["role"] == "target"].assign(quality_DSC=lambda t: _quality(t, "DSC"),
                                                           quality_NSD=lambda t: _quality(t, "NSD"))
    domain = domain_columns(split)[-1 if split == "scanner" else 0]
    rows = []
    for method, group in target.groupby("method"):
        for name in ranked_scores(per_case)[0]:
            kind, score = score_kind(name), f"conf_{name}"
            quality = f"quality_{kind.quality}"
            valid = group[group[score].notna() & group[quality].notna()]
            if len(valid) < 2 or valid[score].nunique() < 2:
                continue  # a score that is constant over the cases ranks nothing
            subsets = [("pooled", valid)] + [(str(d), g) for d, g in valid.groupby(domain)]
            for domain_name, subset in subsets:
                if len(subset) >= 2:
                    rows.append({"method": method, "score": name, "direction": kind.arrow, "quality": kind.quality,
                                 "domain": domain_name,
                                 **failure_detection_metrics(as_confidence(name, subset[score]), subset[quality],
                                                             kind.estimates_quality)})
    return pd.DataFrame(rows)


def stars(p: float) -> str:
    """** p < 0.01, * p < 0.05."""
    return "" if not np.isfinite(p) else "**" if p < 0.01 else "*" if p < 0.05 else ""


def format_p(p: float) -> str:
    """A p-value as tables print it: three decimals, ``<0.001`` below that, ``—`` where there is none."""
    return "—" if not np.isfinite(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def holm(p_values) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (same order; NaN stays NaN and does not count as a comparison): the i-th
    smallest of m p-values becomes max over j ≤ i of min(1, (m − j + 1) · p_(j))."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def significance_metrics(per_case: pd.DataFrame) -> list:
    """DSC (the mean over labels where there are several) and each label's DSC, ECE in both views."""
    labels = sorted(c for c in per_case.columns if c.startswith("DSC_"))
    return [m for m in ["DSC", *labels, "ECE", "ECE_boundary"] if m in per_case]


def is_baseline(label: str) -> bool:
    """A row label ("nnunet", "nnunet (2d)") of a method the registry declares ``compared_as="baseline"``, or of
    predictions no registered method made (external predictions are compared against, as a baseline would be)."""
    method = METHODS.get(label.split(" (")[0])
    return method is None or method.compared_as == "baseline"


def _paired_values(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(method values, baseline values, "seeds" or "cases"): the per-seed means when at least two seeds are shared,
    else the cases both have (against external predictions, which have no seed: each case's mean over seeds)."""
    shared_seeds = sorted(set(a.seed) & set(b.seed))
    if len(shared_seeds) >= 2:
        return (a.groupby("seed")[metric].mean()[shared_seeds].values,
                b.groupby("seed")[metric].mean()[shared_seeds].values, "seeds")
    if EXTERNAL_SEED in set(a.seed) | set(b.seed):
        a, b = (t.groupby(["case_id", "fold"], as_index=False)[metric].mean().assign(seed=EXTERNAL_SEED)
                for t in (a, b))
    paired = a.merge(b, on=["case_id", "fold", "seed"], suffixes=("", "_baseline"))
    paired = paired[paired[metric].notna() & paired[f"{metric}_baseline"].notna()]
    return paired[metric].values, paired[f"{metric}_baseline"].values, "cases"


def _tests(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(paired t-test p, Wilcoxon p), NaN where there is nothing to test."""
    if len(x) < 2 or not np.any(x != y):
        return float("nan"), float("nan")
    try:
        w_p = float(stats.wilcoxon(x, y).pvalue)
    except ValueError:
        w_p = float("nan")
    return float(stats.ttest_rel(x, y).pvalue), w_p


def significance(per_case: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """Paired t-test and Wilcoxon of each method against the strongest baseline on the target cases: over
    seeds (means per seed) when at least two seeds are shared, else over cases. The baseline pool holds the
    methods the registry declares ``compared_as="baseline"`` (:func:`is_baseline`), without prompt-setting
    variants ("samft [3P]") or post-hoc rows. ``*_holm``: Holm-adjusted over every comparison of the table (per
    test); ``significant`` stars the adjusted t-test p."""
    target = per_case[(per_case["role"] == "target") & ~per_case["method"].str.contains(r" \+ ")]
    methods = sorted(target["method"].unique())
    own = [m for m in methods if not m.endswith("]")]
    baselines = [m for m in own if is_baseline(m)] or own
    rows = []
    for metric in metrics or significance_metrics(per_case):
        if metric not in target or target[metric].isna().all():
            continue
        means = target.groupby("method")[metric].mean()[baselines].dropna()
        if means.empty:
            continue
        baseline = means.idxmin() if metric.startswith(LOWER_IS_BETTER) else means.idxmax()
        for method in (m for m in methods if m != baseline):
            x, y, over = _paired_values(target[target.method == method], target[target.method == baseline], metric)
            t_p, w_p = _tests(x, y)
            rows.append({"metric": metric, "method": method, "baseline": baseline, "over": over, "n": len(x),
                         "mean": float(np.mean(x)) if len(x) else float("nan"),
                         "baseline_mean": float(np.mean(y)) if len(y) else float("nan"),
                         "t_test_p": t_p, "wilcoxon_p": w_p})
    table = pd.DataFrame(rows, columns=["metric", "method", "baseline", "over", "n", "mean", "baseline_mean",
                                        "t_test_p", "wilcoxon_p"])
    table["t_test_p_holm"] = holm(table["t_test_p"])
    table["wilcoxon_p_holm"] = holm(table["wilcoxon_p"])
    table["significant"] = [stars(p) for p in table["t_test_p_holm"]]
    return table


COMPUTE_COLUMNS = ("training s", "prediction s", "prompt settings s")


def compute_time(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per row label (method, qualified as the other tables are; ``METHOD + HEAD`` for a confidence head):
    ``runs`` (runs of the row), ``timed`` (those that recorded seconds) and the mean of each of
    ``COMPUTE_COLUMNS`` over the runs that recorded it (NaN where none did)."""
    columns = ["method", "runs", "timed", *COMPUTE_COLUMNS]
    if per_run.empty:
        return pd.DataFrame(columns=columns)
    grouped = per_run.groupby("method", sort=True)
    table = grouped[list(COMPUTE_COLUMNS)].mean()
    table.insert(0, "timed", grouped["timed"].sum().astype(int))
    table.insert(0, "runs", grouped.size())
    return table.reset_index()[columns]

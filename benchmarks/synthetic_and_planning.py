"""Time calib_convert synthetic and calib_plan_and_preprocess on the default benchmark; prints JSON.

    python benchmarks/synthetic_and_planning.py [--shape 64] [--cases-per-center 8] [-np 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import click


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--cases-per-center", type=int, default=8)
    parser.add_argument("-np", "--num-processes", type=int, default=2)
    args = parser.parse_args()

    from calibnet.dataset_conversion.synthetic import SyntheticConfig, convert_synthetic
    from calibnet.paths import setup_data_roots
    from calibnet.planners.plan_and_preprocess import plan_and_preprocess

    with tempfile.TemporaryDirectory() as data_dir:
        os.environ["CALIBNET_DATA"] = data_dir
        roots = setup_data_roots()
        config = SyntheticConfig(dataset_id=501, shape=(args.shape,) * 3, cases_per_center=args.cases_per_center)
        start = time.perf_counter()
        convert_synthetic(config, roots.raw, num_processes=args.num_processes, progress=False)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its plans; keep stdout for the JSON
            result = plan_and_preprocess(501, roots.raw, roots.preprocessed, num_processes=args.num_processes,
                                         log=lambda _: None)
        plan_s = time.perf_counter() - start
    n_cases = config.n_centers * config.cases_per_center
    click.echo(json.dumps({
        "benchmark": "synthetic_and_planning", "shape": args.shape, "cases": n_cases,
        "num_processes": args.num_processes, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "convert_seconds": round(convert_s, 2), "convert_seconds_per_case": round(convert_s / n_cases, 3),
        "plan_and_preprocess_seconds": round(plan_s, 2),
        "patch_3d_fullres": result.plans["configurations"]["3d_fullres"]["patch_size"],
    }))


if __name__ == "__main__":
    main()

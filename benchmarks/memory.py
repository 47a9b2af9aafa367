"""Peak resident memory of calib_train calsam and calib_predict, and how it grows with cases; prints JSON.

    python benchmarks/memory.py [--cases-per-center 1,2,3] [--shape 64] [--caps 512,16] [--sam-model tiny]
                                [--configuration 2d] [--epochs 1] [--iters-per-epoch 2]

For each size of the synthetic benchmark (built in a temporary CALIBNET_DATA, ``--configuration`` planned
and preprocessed), each in a fresh child process:
- ``calib_train 501 CONFIGURATION calsam 0 --split scanner --epochs E --iters-per-epoch I --device cpu``
  once with a store holding only the smaller sizes' slices ("cold": the added cases' slices are encoded,
  by the training and by its val/test prediction), then again with the store warm once per in-RAM
  embedding cap of ``--caps`` (MiB, set through $CALIBNET_EMBEDDING_CACHE_MIB; "none": every slice in RAM);
- ``calib_predict`` of that run over the fold's test cases (prompts from their labels).
The synthetic cases are a function of (seed, center, number), so each size's store starts with the entries
of the size before it. A peak is ru_maxrss (RUSAGE_CHILDREN) of a small wrapper process that runs the
command: the largest resident set of any one process of the command's tree. ``*_mib_per_case`` are least-
squares slopes over the sizes: training against its train + val cases, prediction against its test cases.
Default backbone LiteMedSAM (about 2 s of CPU per slice to encode on 2 cores); ``--sam-model tiny``,
fewer sizes or ``--caps 512`` make it shorter.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WRAPPER = ("import json, resource, subprocess, sys\n"
           "with open(sys.argv[1], 'a') as log:\n"
           "    code = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode\n"
           "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
           "print(json.dumps({'returncode': code, 'maxrss_kib': peak}))")


def _cli(module: str) -> list:
    return [sys.executable, "-c", f"import sys; from calibnet.cli.{module} import main; sys.exit(main())"]


def peak_rss_mib(command: list, log: Path, environment: dict | None = None) -> float:
    """Peak resident MiB of ``command`` run in a fresh process tree (its output appended to ``log``)."""
    with open(log, "a") as stream:
        stream.write(f"\n$ {' '.join(command)}\n")
    result = subprocess.run([sys.executable, "-c", WRAPPER, str(log), *command], capture_output=True, text=True,
                            env={**os.environ, **(environment or {})})
    if result.returncode != 0:
        raise RuntimeError(f"the measuring wrapper failed: {result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["returncode"] != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command[3:])} failed (exit {measured['returncode']}):\n{tail}")
    return round(measured["maxrss_kib"] / 1024, 1)


def slope(xs: list, ys: list) -> float | None:
    """Least-squares slope of ys against xs; None with fewer than two distinct xs."""
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
                 / sum((x - mean_x) ** 2 for x in xs), 2)


def _linked(folder: Path, files: list) -> Path:
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


def _training_log(results: Path) -> str:
    return "".join(p.read_text() for p in sorted(results.rglob("training_log_*.txt")))


def measure_size(args, cases_per_center: int, saved_store: Path, work: Path) -> dict:
    from common import temporary_benchmark_dataset

    with temporary_benchmark_dataset(args.shape, cases_per_center, configurations=(args.configuration,)) as (roots, _):
        dataset = next(roots.preprocessed.glob("Dataset501_*"))
        store = dataset / "calib_embeddings"
        if saved_store.exists():
            shutil.copytree(saved_store, store)
        fold = json.loads((dataset / "calib_splits.json").read_text())[args.split]["folds"][args.fold]
        log = work / f"size{cases_per_center}.log"
        train = [*_cli("train"), "501", args.configuration, "calsam", str(args.fold), "--split", args.split,
                 "--epochs", str(args.epochs), "--iters-per-epoch", str(args.iters_per_epoch), "--device", "cpu"]
        if args.sam_model:
            train += ["--sam-model", args.sam_model]
        row = {"cases_per_center": cases_per_center, "train_val_cases": len(fold["train"]) + len(fold["val"]),
               "test_cases": len(fold["test"])}
        row["train_cold_peak_rss_mib"] = peak_rss_mib(train, log)
        found, encoded = map(int, re.search(r"embedding store \S+: (\d+) slices found, (\d+) encoded",
                                            _training_log(roots.results)).groups())
        row["train_val_slices"], row["train_val_slices_encoded_cold"] = found + encoded, encoded
        row["train_peak_rss_mib"] = {}
        for cap in args.caps:
            row["train_peak_rss_mib"][cap] = peak_rss_mib(train + ["--overwrite"], log,
                                                          {"CALIBNET_EMBEDDING_CACHE_MIB": cap})
        held = re.findall(r"embedding cache after epoch \d+: .*?, (\d+) slices held \(([\d.]+) MiB",
                          _training_log(roots.results))
        row["last_run_slices_held"] = int(held[-1][0]) if held else None

        raw = next(roots.raw.glob("Dataset501_*"))
        images = _linked(work / f"images{cases_per_center}",
                         [p for case in fold["test"] for p in sorted((raw / "imagesTr").glob(f"{case}_*.nii.gz"))])
        labels = _linked(work / f"labels{cases_per_center}",
                         [raw / "labelsTr" / f"{case}.nii.gz" for case in fold["test"]])
        predict = [*_cli("predict"), "-d", "501", "-m", "calsam", "-f", str(args.fold), "-c", args.configuration,
                   "--split", args.split, "-i", str(images), "-o", str(work / f"predicted{cases_per_center}"),
                   "--prompts-from", str(labels), "--device", "cpu"]
        row["predict_peak_rss_mib"] = peak_rss_mib(predict, log)
        entries = list(store.rglob("*.pt"))
        row["store_entries"] = len(entries)
        row["store_mib"] = round(sum(p.stat().st_size for p in entries) / 2 ** 20, 1)
        shutil.rmtree(saved_store, ignore_errors=True)
        shutil.copytree(store, saved_store)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases-per-center", default="1,2,3", help="dataset sizes, comma-separated (4 centers)")
    parser.add_argument("--shape", type=int, default=64)
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--split", default="scanner")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iters-per-epoch", type=int, default=2)
    parser.add_argument("--caps", default="512,16",
                        help="in-RAM embedding caps (MiB, or none) of the warm training runs, comma-separated")
    parser.add_argument("--sam-model", default=None, help="default: litemedsam (the packaged LiteMedSAM)")
    args = parser.parse_args()
    args.caps = [c.strip() for c in args.caps.split(",") if c.strip()]
    sizes = sorted(int(c) for c in args.cases_per_center.split(","))

    from calibnet.networks.sam_backbone import resolve_sam_config
    from calibnet.trainers.nnUNetTrainerSAM import nnUNetTrainerSAMFT

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        imports = peak_rss_mib([sys.executable, "-c", "import calibnet.cli.train, calibnet.cli.predict, "
                                "calibnet.trainers.nnUNetTrainerSAM"], work / "imports.log")
        rows = [measure_size(args, size, work / "store", work) for size in sizes]
    train_cases = [r["train_val_cases"] for r in rows]
    train_slices = [r["train_val_slices"] for r in rows]
    print(json.dumps({
        "benchmark": "memory", "sam": resolve_sam_config(args.sam_model, None)[0].describe(),
        "command": f"calib_train 501 {args.configuration} calsam {args.fold} --split {args.split} --epochs "
                   f"{args.epochs} --iters-per-epoch {args.iters_per_epoch} --device cpu; calib_predict of its "
                   f"test cases",
        "shape": args.shape, "default_cap_mib": nnUNetTrainerSAMFT.embedding_cache_mib,
        "imports_peak_rss_mib": imports, "sizes": rows,
        "train_cold_mib_per_train_val_case": slope(train_cases, [r["train_cold_peak_rss_mib"] for r in rows]),
        "train_mib_per_train_val_case": {cap: slope(train_cases, [r["train_peak_rss_mib"][cap] for r in rows])
                                         for cap in args.caps},
        "train_mib_per_train_val_slice": {cap: slope(train_slices, [r["train_peak_rss_mib"][cap] for r in rows])
                                          for cap in args.caps},
        "predict_mib_per_test_case": slope([r["test_cases"] for r in rows], [r["predict_peak_rss_mib"] for r in rows]),
    }))


if __name__ == "__main__":
    main()

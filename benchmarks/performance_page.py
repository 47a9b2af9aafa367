"""Every benchmark in one table: run them, keep their JSON, and render docs/performance.md from it.

    python benchmarks/performance_page.py run [NAME ...] [--quick] [--device cuda]
    python benchmarks/performance_page.py render

``run`` runs each named benchmark (default: all; with ``--device``, those that take it) as its own process
with the arguments of :data:`BENCHMARKS`, adds what machine it ran on, the command, the UTC date and the wall
seconds, and writes ``benchmarks/results/NAME.json`` (``NAME-cuda.json`` where it ran on CUDA; ``--quick``:
smaller arguments, a smoke run whose result goes to ``benchmarks/results/quick/``, never onto the page); a
benchmark that fails keeps its previous result, the others still run, and the exit status is 1. Each benchmark
runs through a small wrapper that, where the benchmark used CUDA, also records the process's peak GPU memory.
``run`` then renders the page; ``render`` alone rebuilds it from the result files (:func:`render_page` is a pure
function of the results).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

BENCHMARKS_DIR = Path(__file__).resolve().parent
ROOT = BENCHMARKS_DIR.parent
RESULTS = BENCHMARKS_DIR / "results"
PAGE = ROOT / "docs" / "performance.md"
MISSING = "—"
STDERR_TAIL_LINES = 40

# Runs the benchmark script as `python SCRIPT ARGS` would (its folder first on sys.path, __name__ == "__main__"),
# then writes the process's peak CUDA memory to $CALIBNET_BENCHMARK_PROBE where the benchmark initialised CUDA.
PROBE = """\
import json, os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        devices = range(torch.cuda.device_count())
        with open(os.environ["CALIBNET_BENCHMARK_PROBE"], "w") as stream:
            json.dump({"peak_allocated_mib": round(max(torch.cuda.max_memory_allocated(d) for d in devices) / 2**20, 1),
                       "peak_reserved_mib": round(max(torch.cuda.max_memory_reserved(d) for d in devices) / 2**20, 1)},
                      stream)
"""


def _at(result: dict, path: str):
    """The value at a dotted key path of a nested dict, None where any key is missing."""
    value = result
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _figures(result: dict, spec: list) -> list:
    """(label, value, unit) for each (label, dotted path, unit) of ``spec``."""
    return [(label, _at(result, path), unit) for label, path, unit in spec]


def _confidence_timing(result: dict) -> list:
    return _figures(result, [
        ("segmentation", "median_seconds_per_case.segmentation", "s/case"),
        ("segmentation + confidence head", "median_seconds_per_case.segmentation_and_head", "s/case"),
        ("head overhead", "head_overhead_percent", "%"),
        ("MC-dropout agreement N=15 / segmentation + head", "agreement_N15_over_segmentation_and_head", "×")])


def _encoder_speed(result: dict) -> list:
    chosen = result.get("fastest_eligible_eager")
    speedup = next((key for key in result if key.startswith("speedup_vs_old_batch")), None)
    old = f"old_batch{speedup.removeprefix('speedup_vs_old_batch')}" if speedup else None
    candidates = result.get("candidates") if isinstance(result.get("candidates"), dict) else {}
    return [(f"chosen path ({chosen or MISSING})", _at(candidates.get(chosen) or {}, "slices_per_second"), "slices/s"),
            (f"old path ({old or MISSING})", _at(candidates.get(old) or {}, "slices_per_second"), "slices/s"),
            ("speedup", result.get(speedup) if speedup else None, "×"),
            ("max relative error of the chosen path", _at(candidates.get(chosen) or {}, "max_rel_error"), "")]


def _evaluation_speed(result: dict) -> list:
    return _figures(result, [
        ("BraTS-size case (240×240×155), one core", "median_seconds_per_case.240x240x155.one_core", "s/case"),
        ("BraTS-size case, `-np 2`", "median_seconds_per_case.240x240x155.np2", "s/case"),
        ("BraTS-size case, reading its files alone", "median_seconds_per_case.240x240x155.reading_only_one_core",
         "s/case"),
        ("128³ case, one core", "median_seconds_per_case.128^3.one_core", "s/case")])


def _fip_estimator(result: dict) -> list:
    return _figures(result, [
        ("calsam amortised / samft", "sam.calsam_amortised_over_samft", "×"),
        ("calsam exact / samft", "sam.calsam_exact_over_samft", "×"),
        ("calunet amortised / nnunet", "unet.calunet_amortised_over_nnunet", "×"),
        ("calunet exact / nnunet", "unet.calunet_exact_over_nnunet", "×"),
        ("SAM: FIP's share of the gradient norm", "sam.fip_share_of_gradient_norm_mean", ""),
        ("SAM: cosine, reusing step vs exact whole-loss gradient (mean)", "sam.amortised_total_gradient_cosine_mean", ""),
        ("U-Net: FIP's share of the gradient norm", "unet.fip_share_of_gradient_norm_mean", ""),
        ("U-Net: cosine, reusing step vs exact whole-loss gradient (mean)",
         "unet.amortised_total_gradient_cosine_mean", "")])


def _memory(result: dict) -> list:
    sizes = result.get("sizes") if isinstance(result.get("sizes"), list) and result.get("sizes") else [{}]
    largest = sizes[-1] if isinstance(sizes[-1], dict) else {}
    where = f"{largest.get('cases_per_center', MISSING)} cases/center"
    capped = largest.get("train_peak_rss_mib") if isinstance(largest.get("train_peak_rss_mib"), dict) else {}
    return [(f"calib_train peak RSS, cold store ({where})", largest.get("train_cold_peak_rss_mib"), "MiB"),
            *[(f"calib_train peak RSS, warm store, cap {cap}{' MiB' * cap.isdigit()} ({where})", mib, "MiB")
              for cap, mib in capped.items()],
            (f"calib_predict peak RSS ({where})", largest.get("predict_peak_rss_mib"), "MiB"),
            ("training, per added train/val case (cold)", result.get("train_cold_mib_per_train_val_case"), "MiB"),
            ("prediction, per added test case", result.get("predict_mib_per_test_case"), "MiB")]


def _safeclick_overhead(result: dict) -> list:
    return _figures(result, [
        ("SafeClick decoder overhead vs SAM 2", "decoder_overhead_percent", "%"),
        ("SafeClick encoder + decoder overhead", "total_overhead_percent", "%"),
        ("SafeClick encoder + decoder", "safeclick_total_seconds_per_slice", "s/slice")])


def _sam_step(result: dict) -> list:
    return _figures(result, [
        ("frozen encoder", "encoder_seconds_per_slice", "s/slice"),
        ("samft step", "samft_cached_step_seconds", "s"),
        ("calsam / samft", "calsam_over_samft", "×"),
        ("samft loop / batched decoding", "samft_loop_over_batched", "×"),
        ("calsam loop / batched decoding", "calsam_loop_over_batched", "×"),
        ("encoder every step / embedding cache", "encoder_every_step_over_cached", "×")])


def _synthetic_and_planning(result: dict) -> list:
    return _figures(result, [
        ("calib_convert synthetic", "convert_seconds_per_case", "s/case"),
        ("calib_plan_and_preprocess", "plan_and_preprocess_seconds", "s"),
        ("cases", "cases", "")])


def _train_step(result: dict) -> list:
    return _figures(result, [
        ("nnunet step", "nnunet.median_step_seconds", "s"),
        ("calunet step (exact FIP)", "calunet.median_step_seconds", "s"),
        ("calunet (exact FIP) / nnunet", "calunet_over_nnunet", "×")])


class Benchmark(NamedTuple):
    """A script of benchmarks/, the arguments the page documents, smaller ones for ``--quick``, whether it
    takes ``--device``, and the figures that head its row."""
    script: str
    arguments: tuple
    quick: tuple
    takes_device: bool
    headline: Callable[[dict], list]


BENCHMARKS = {
    "train_step": Benchmark("train_step.py", ("--shape", "64", "--steps", "10"), ("--shape", "32", "--steps", "2"),
                            True, _train_step),
    "fip_estimator": Benchmark("fip_estimator.py", ("--shape", "64", "--steps", "6", "--batches", "6"),
                               ("--shape", "32", "--steps", "2", "--batches", "2", "--sam-model", "tiny"), True,
                               _fip_estimator),
    "sam_step": Benchmark("sam_step.py", ("--shape", "64", "--steps", "10"),
                          ("--shape", "32", "--steps", "2", "--sam-model", "tiny"), True, _sam_step),
    "encoder_speed": Benchmark("encoder_speed.py", ("--slices", "8", "--repeats", "3"),
                               ("--slices", "2", "--repeats", "1"), False, _encoder_speed),
    "confidence_timing": Benchmark("confidence_timing.py", ("--shape", "64", "--repeats", "3"),
                                   ("--shape", "32", "--repeats", "1"), True, _confidence_timing),
    "safeclick_overhead": Benchmark("safeclick_overhead.py", ("--slices", "8", "--repeats", "5"),
                                    ("--slices", "2", "--repeats", "1"), True, _safeclick_overhead),
    "evaluation_speed": Benchmark("evaluation_speed.py", ("--cases", "4", "--repeats", "3"),
                                  ("--cases", "1", "--repeats", "1"), False, _evaluation_speed),
    "memory": Benchmark("memory.py", ("--cases-per-center", "1,2,3", "--shape", "64", "--caps", "512,16"),
                        ("--cases-per-center", "1,2", "--shape", "32", "--caps", "512", "--sam-model", "tiny"),
                        False, _memory),
    "synthetic_and_planning": Benchmark("synthetic_and_planning.py", ("--shape", "64", "--cases-per-center", "8"),
                                        ("--shape", "32", "--cases-per-center", "2"), False, _synthetic_and_planning),
}


# ---------------------------------------------------------------- run

def machine() -> dict:
    """What this machine is, without its hostname: CPU model, cores, RAM, torch and its threads, CUDA device."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total_kib = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
    info = {"cpu": models[0].strip() if models else platform.processor() or platform.machine(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "ram_gib": round(int(total_kib.group(1)) / 2 ** 20, 1) if total_kib else None,
            "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(cuda_device=properties.name, cuda_devices=torch.cuda.device_count(),
                    cuda_memory_gib=round(properties.total_memory / 2 ** 30, 1), cuda_version=torch.version.cuda)
    return info


def command_of(name: str, quick: bool = False, device: str | None = None) -> list:
    """The documented argv of a benchmark, starting with its script's path (absolute)."""
    benchmark = BENCHMARKS[name]
    arguments = list(benchmark.quick if quick else benchmark.arguments)
    if device is not None:
        arguments += ["--device", device]
    return [str(BENCHMARKS_DIR / benchmark.script), *arguments]


def shown_command(argv: list) -> str:
    """``python benchmarks/SCRIPT ARGS`` as a user types it from the repository root."""
    script = Path(argv[0])
    shown = script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else str(script)
    return shlex.join(["python", shown, *argv[1:]])


def parse_json_output(stdout: str) -> dict:
    """The JSON object a benchmark printed (the first line-start ``{`` from which the rest parses)."""
    text = stdout.strip()
    for start in [0, *(m.start() + 1 for m in re.finditer(r"\n\{", text))]:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("it printed no JSON object on stdout")


def result_path(name: str, device: str | None = None, results: Path | None = None) -> Path:
    suffix = f"-{re.sub(r'[^A-Za-z0-9]', '', device)}" if device and device != "cpu" else ""
    return (results or RESULTS) / f"{name}{suffix}.json"


def run_one(name: str, quick: bool, device: str | None, machine_record: dict, results: Path) -> tuple:
    """Run one benchmark; (result file or None, the stderr tail where it failed)."""
    from calibnet.files import atomic_write_json

    argv = command_of(name, quick, device)
    tail = collections.deque(maxlen=STDERR_TAIL_LINES)
    with tempfile.TemporaryDirectory() as folder:
        probe, stdout_path = Path(folder) / "probe.json", Path(folder) / "stdout.txt"
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        load_before = round(os.getloadavg()[0], 2)
        start = time.perf_counter()
        with open(stdout_path, "w") as stdout:
            process = subprocess.Popen([sys.executable, "-c", PROBE, *argv], cwd=ROOT, stdout=stdout,
                                       stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "CALIBNET_BENCHMARK_PROBE": str(probe)})
            for line in process.stderr:  # shown as it comes: benchmarks take minutes
                sys.stderr.write(f"[{name}] {line}")
                tail.append(line)
            returncode = process.wait()
        wall_seconds = round(time.perf_counter() - start, 1)
        if returncode != 0:
            return None, f"exit status {returncode}; stderr ends:\n{''.join(tail)}"
        try:
            result = parse_json_output(stdout_path.read_text())
        except ValueError as error:
            return None, f"{error}; stderr ends:\n{''.join(tail)}"
        device = device or str(result.get("device", "cpu"))  # a benchmark's own default may be cuda
        record = {"benchmark": name, "command": shown_command(argv), "quick": quick,
                  "device": device, "date": date, "wall_seconds": wall_seconds,
                  "load_average_1min_before": load_before, "machine": machine_record, "result": result}
        if probe.exists():
            record["gpu_memory"] = json.loads(probe.read_text())
    path = result_path(name, device, results)
    atomic_write_json(path, record)
    return path, None


def run(names: list, quick: bool = False, device: str | None = None, results: Path | None = None) -> int:
    """Run the benchmarks ``names`` (every one when empty; with ``device``, those that take it); 1 if any failed."""
    results = (results or RESULTS) / ("quick" if quick else "")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if device is not None:
        deviceless = [n for n in names if not BENCHMARKS[n].takes_device]
        if deviceless:
            raise SystemExit(f"{', '.join(deviceless)}: no --device (CPU only); run without --device")
        names = names or [n for n, b in BENCHMARKS.items() if b.takes_device]
    results.mkdir(parents=True, exist_ok=True)
    machine_record = machine()
    failed = []
    for name in names or list(BENCHMARKS):
        print(f"running {name}: {shown_command(command_of(name, quick, device))}", file=sys.stderr, flush=True)
        path, failure = run_one(name, quick, device, machine_record, results)
        if failure:
            failed.append(name)
            print(f"{name} FAILED ({failure.rstrip()})\n{name}: its previous result, if any, is kept",
                  file=sys.stderr, flush=True)
        else:
            print(f"{name}: wrote {path}", file=sys.stderr, flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------- render

def read_results(results: Path | None = None) -> list:
    """Every result file, sorted by name."""
    records = []
    for path in sorted((results or RESULTS).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}: not valid JSON ({error}); run its benchmark again or delete the file")
    return records


def format_value(value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and len(repr(value)) > 10:
        return format(value, ".4g")
    return str(value)


def headline_cell(record: dict) -> str:
    benchmark = BENCHMARKS.get(record.get("benchmark"))
    result = record.get("result") if isinstance(record.get("result"), dict) else {}
    if benchmark is None:
        return MISSING
    figures = [f"{label}: {format_value(value)}{' ' + unit if unit and value is not None else ''}"
               for label, value, unit in benchmark.headline(result)]
    return "<br>".join(figures)


def machine_cell(record: dict) -> str:
    info = record.get("machine") if isinstance(record.get("machine"), dict) else {}
    cores = f"{info.get('usable_cores', MISSING)} of {info.get('logical_cores', MISSING)} cores"
    cell = f"{info.get('cpu', MISSING)}, {cores}, {format_value(info.get('ram_gib'))} GiB RAM"
    if is_gpu(record):
        cell += f", GPU {info.get('cuda_device', MISSING)}"
    return cell


def is_gpu(record: dict) -> bool:
    return str(record.get("device", "")).startswith("cuda")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _title(record: dict) -> str:
    title = record.get("benchmark", MISSING)
    if record.get("device") and record.get("device") != "cpu":
        title += f" ({record['device']})"
    if record.get("quick"):
        title += " (--quick smoke run, not a measurement)"
    return title


def _ordered(records: list) -> list:
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    return sorted(records, key=lambda r: (order.get(r.get("benchmark"), len(order)), str(r.get("benchmark")),
                                          is_gpu(r), str(r.get("device"))))


INTRO = """\
# Performance

What calibnet's benchmarks measured. Each figure comes from `benchmarks/performance_page.py run`, which ran the
benchmark's script (in `benchmarks/`) with the command shown, on the machine named in its row, at the date
shown; this page is written by that script from the result files in `benchmarks/results/` and is not edited
by hand. Regenerate it from the repository root:

```bash
nice -n 19 python benchmarks/performance_page.py run                 # every benchmark, the commands below
nice -n 19 python benchmarks/performance_page.py run train_step      # some of them
python benchmarks/performance_page.py run --quick memory             # a smoke run (not shown here)
python benchmarks/performance_page.py render                         # this page from the result files
```

A benchmark that fails keeps its previous result. Seconds measured on a shared machine vary with its load (each
result file records the load average before its run); the ratios between methods timed in one run, on the same
batch and the same machine, are the robust figures. ×: ratio; s: seconds (medians or means as each script's
docstring says).
"""


def _gpu_section(records: list) -> list:
    gpu = [r for r in _ordered(records) if is_gpu(r)]
    command = "python benchmarks/performance_page.py run --device cuda"
    takes = ", ".join(n for n, b in BENCHMARKS.items() if b.takes_device)
    lines = ["## GPU", ""]
    if not gpu:
        return lines + [
            "No GPU run has been made: no GPU was available to the machine calibnet is developed on, and figures "
            "here are never estimated, only measured. On a machine with a CUDA GPU, fill this section in with",
            "", "```bash", command, "```", "",
            f"which runs the benchmarks that take `--device` ({takes}) with `--device cuda`, writes their results "
            "beside the CPU ones (`benchmarks/results/NAME-cuda.json`) and renders this page again; the card is "
            "named from torch, and each benchmark process's peak GPU memory is recorded.", ""]
    lines += [f"Measured with `{command}` ({takes} take `--device`); the card is named by torch. Peak GPU memory "
              "is the largest `torch.cuda.max_memory_allocated` (reserved: `max_memory_reserved`) of the "
              "benchmark's whole process, every method it compares included.", "",
              "| Benchmark | Card | Headline figures | Peak GPU memory | Date |", "|---|---|---|---|---|"]
    for record in gpu:
        memory = record.get("gpu_memory") if isinstance(record.get("gpu_memory"), dict) else {}
        peak = (f"{format_value(memory.get('peak_allocated_mib'))} MiB allocated, "
                f"{format_value(memory.get('peak_reserved_mib'))} MiB reserved") if memory else MISSING
        card = _at(record, "machine.cuda_device") or MISSING
        lines.append(f"| {_cell(_title(record))} | {_cell(str(card))} | {_cell(headline_cell(record))} | {peak} "
                     f"| {str(record.get('date', MISSING))[:10]} |")
    steps = [("nnunet", "train_step", "nnunet.median_step_seconds"),
             ("calunet", "train_step", "calunet.median_step_seconds"),
             ("samft", "sam_step", "samft_cached_step_seconds"),
             ("calsam", "sam_step", "calsam_cached_step_seconds")]
    lines += ["", "Seconds per training step on the GPU (one step on one batch, median over the benchmark's "
              "steps). Seconds per epoch are not shown: no benchmark times a whole epoch (data loading and "
              "validation included), and a step's seconds times the epoch's iterations would be an estimate.", "",
              "| Method | Seconds per step | Benchmark | Card |", "|---|---|---|---|"]
    for method, name, path in steps:
        for record in (r for r in gpu if r.get("benchmark") == name):
            seconds = format_value(_at(record.get("result") or {}, path))
            lines.append(f"| {method} | {seconds} | {_cell(_title(record))} "
                         f"| {_cell(str(_at(record, 'machine.cuda_device') or MISSING))} |")
    return lines + [""]


def render_page(records: list) -> str:
    """docs/performance.md from result records (the dicts ``run`` writes); a pure function."""
    records = _ordered(records)
    run_names = {r.get("benchmark") for r in records}
    lines = [INTRO, "## Every benchmark", "", "| Benchmark | Command | Headline figures | Machine | Date |",
             "|---|---|---|---|---|"]
    rows = [(r.get("benchmark"), r) for r in records]
    rows += [(name, None) for name in BENCHMARKS if name not in run_names]
    order = {name: i for i, name in enumerate(BENCHMARKS)}
    for name, record in sorted(rows, key=lambda row: order.get(row[0], len(order))):
        if record is None:
            command = shown_command(command_of(name))
            lines.append(f"| {name} | `{_cell(command)}` | not run yet | {MISSING} | {MISSING} |")
        else:
            lines.append(f"| {_cell(_title(record))} | `{_cell(str(record.get('command', MISSING)))}` | "
                         f"{_cell(headline_cell(record))} | {_cell(machine_cell(record))} | "
                         f"{str(record.get('date', MISSING))[:10]} |")
    lines += ["", *_gpu_section(records)]
    if records:
        lines += ["## Full results", "", "Each result file as `run` wrote it: the benchmark's own JSON under "
                  "`result`, the machine, the command, the UTC date and the wall seconds of the whole run.", ""]
        for record in records:
            lines += [f"<details><summary>{_title(record)}</summary>", "", "```json",
                      json.dumps(record, indent=1, ensure_ascii=False), "```", "", "</details>", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def render(results: Path | None = None, page: Path | None = None) -> Path:
    from calibnet.files import atomic_write_text

    page = page or PAGE
    atomic_write_text(page, render_page(read_results(results)))
    return page


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run benchmarks, write benchmarks/results/NAME.json, render")
    run_parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all ({', '.join(BENCHMARKS)})")
    run_parser.add_argument("--quick", action="store_true",
                            help="smaller arguments: a smoke run, written to benchmarks/results/quick/, not rendered")
    run_parser.add_argument("--device", default=None,
                            help="passed to the benchmarks that take it (default: theirs, cuda where available)")
    commands.add_parser("render", help="write docs/performance.md from benchmarks/results/*.json")
    args = parser.parse_args(argv)
    status = run(args.names, args.quick, args.device) if args.command == "run" else 0
    print(f"wrote {render()}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

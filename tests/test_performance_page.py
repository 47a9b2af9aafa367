"""benchmarks/performance_page.py: the page rendered from hand-made results, and `run` on fake benchmarks."""
import datetime
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "performance_page.py"


@pytest.fixture
def page_module():
    spec = importlib.util.spec_from_file_location("performance_page", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPU = {"cpu": "Test CPU 3000", "logical_cores": 4, "usable_cores": 2, "ram_gib": 15.6, "torch": "2.0"}
TRAIN_STEP = {"benchmark": "train_step", "command": "python benchmarks/train_step.py --steps 10", "device": "cpu",
              "date": "2025-01-02T03:04:05+00:00", "machine": CPU,
              "result": {"nnunet": {"median_step_seconds": 0.5}, "calunet": {"median_step_seconds": 0.6},
                         "calunet_over_nnunet": 1.2}}
FIP_MISSING_KEY = {"benchmark": "fip_estimator", "command": "python benchmarks/fip_estimator.py --steps 8",
                   "device": "cpu", "date": "2025-01-03T00:00:00+00:00", "machine": CPU,
                   "result": {"sam": {"calsam_amortised_over_samft": 1.07}}}
SAM_STEP_CUDA = {"benchmark": "sam_step", "command": "python benchmarks/sam_step.py --steps 10 --device cuda",
                 "device": "cuda", "date": "2025-01-04T00:00:00+00:00",
                 "machine": {**CPU, "cuda_device": "NVIDIA Test Card"},
                 "gpu_memory": {"peak_allocated_mib": 812.5, "peak_reserved_mib": 1024.0},
                 "result": {"samft_cached_step_seconds": 0.031, "calsam_cached_step_seconds": 0.036,
                            "calsam_over_samft": 1.161, "encoder_seconds_per_slice": 0.004}}


def _row(page: str, title: str) -> str:
    rows = [line for line in page.splitlines() if line.startswith(f"| {title} |")]
    assert len(rows) == 1, (title, rows)
    return rows[0]


def test_the_page_has_a_row_per_benchmark_with_its_figures(page_module):
    page = page_module.render_page([SAM_STEP_CUDA, FIP_MISSING_KEY, TRAIN_STEP])
    table = page.split("## Every benchmark")[1].split("## GPU")[0]
    assert len([line for line in table.splitlines() if line.startswith("| ")]) - 1 == len(page_module.BENCHMARKS)
    train = _row(table, "train_step")
    assert "nnunet step: 0.5 s" in train and "calunet (exact FIP) / nnunet: 1.2 ×" in train
    assert "Test CPU 3000, 2 of 4 cores, 15.6 GiB RAM" in train and "2025-01-02" in train
    fip = _row(table, "fip_estimator")
    assert "calsam amortised / samft: 1.07 ×" in fip and "calsam exact / samft: —" in fip
    assert "calunet exact / nnunet: —" in fip
    assert "NVIDIA Test Card" in _row(table, "sam_step (cuda)")
    memory = _row(table, "memory")
    assert "not run yet" in memory and "`python benchmarks/memory.py --cases-per-center" in memory
    assert "not run yet" not in train


def test_the_gpu_section_shows_a_cuda_run_and_names_its_card(page_module):
    gpu = page_module.render_page([TRAIN_STEP, SAM_STEP_CUDA]).split("## GPU")[1].split("## Full results")[0]
    assert "No GPU run has been made" not in gpu
    card_row = _row(gpu, "sam_step (cuda)")
    assert "NVIDIA Test Card" in card_row and "812.5 MiB allocated, 1024.0 MiB reserved" in card_row
    assert "calsam / samft: 1.161 ×" in card_row
    assert "| samft | 0.031 |" in gpu and "| calsam | 0.036 |" in gpu
    assert "| nnunet |" not in gpu  # train_step ran on the CPU only


def test_without_a_cuda_run_the_gpu_section_says_how_to_make_one(page_module):
    for records in ([TRAIN_STEP, FIP_MISSING_KEY], []):
        gpu = page_module.render_page(records).split("## GPU")[1]
        assert "No GPU run has been made" in gpu and "never estimated" in gpu
        assert "python benchmarks/performance_page.py run --device cuda" in gpu
        assert "| Card |" not in gpu
    empty = page_module.render_page([])
    assert all("not run yet" in _row(empty, name) for name in page_module.BENCHMARKS)
    assert "## Full results" not in empty


def _fake_benchmarks(module, folder: Path) -> None:
    (folder / "helper.py").write_text("VALUE = 7\n")
    (folder / "good.py").write_text(
        "import json, sys\n"
        "from helper import VALUE\n"  # the script's own folder comes first on sys.path, as for `python good.py`
        "print('a library talks on stdout')\n"
        "print('working', file=sys.stderr)\n"
        "if __name__ == '__main__':\n"
        "    print(json.dumps({'benchmark': 'good', 'value': VALUE, 'argv': sys.argv[1:]}, indent=1))\n")
    (folder / "bad.py").write_text("import sys\nprint('boom: no data', file=sys.stderr)\nsys.exit(3)\n")
    headline = lambda result: [("value", result.get("value"), "s")]  # noqa: E731
    module.BENCHMARKS = {
        "good": module.Benchmark(str(folder / "good.py"), ("--n", "2"), ("--n", "1"), False, headline),
        "bad": module.Benchmark(str(folder / "bad.py"), (), (), False, headline)}


def test_run_writes_each_result_and_reports_a_failure(page_module, tmp_path, capsys):
    _fake_benchmarks(page_module, tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    (results / "bad.json").write_text('{"benchmark": "bad", "result": {"value": 1}}')
    assert page_module.run([], results=results) == 1
    record = json.loads((results / "good.json").read_text())
    assert record["result"] == {"benchmark": "good", "value": 7, "argv": ["--n", "2"]}
    assert record["command"] == shlex.join(["python", str(tmp_path / "good.py"), "--n", "2"])
    assert record["device"] == "cpu" and record["quick"] is False and record["wall_seconds"] >= 0
    assert datetime.datetime.fromisoformat(record["date"]).utcoffset() == datetime.timedelta(0)
    assert {"cpu", "logical_cores", "usable_cores", "ram_gib", "torch", "torch_threads"} <= set(record["machine"])
    assert "gpu_memory" not in record  # good.py never touched CUDA
    assert json.loads((results / "bad.json").read_text())["result"] == {"value": 1}  # the previous result kept
    errors = capsys.readouterr().err
    assert "bad FAILED (exit status 3" in errors and "boom: no data" in errors and "failed: bad" in errors
    page = page_module.render_page(page_module.read_results(results))
    assert "value: 7 s" in _row(page, "good") and "value: 1 s" in _row(page, "bad")


def test_run_refuses_unknown_names_and_device_for_cpu_only_benchmarks(page_module, tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmark nope"):
        page_module.run(["nope"], results=tmp_path)
    with pytest.raises(SystemExit, match="encoder_speed: no --device"):
        page_module.run(["encoder_speed"], device="cuda", results=tmp_path)
    assert page_module.result_path("sam_step", "cuda", tmp_path) == tmp_path / "sam_step-cuda.json"

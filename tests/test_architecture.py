"""The package's imports run one way (DESIGN §2): a lower layer never imports a higher one, not even inside a
function. The test reads every module's import statements (including those inside functions)."""
import ast
from pathlib import Path

import calibnet

PACKAGE = Path(calibnet.__file__).parent
# layer of each first-level name under calibnet; higher layers may import lower ones only
LAYERS = {
    "errors": 0, "files": 0, "paths": 0, "image_geometry": 0, "domains": 0, "runs": 0, "methods": 0, "prompts": 0,
    "prompt_quality": 0, "raw_dataset_checks": 0, "checkpoints": 0,
    # uncertainty_prompting (MedSAM-U's UGMP/UGPA, used by its network) reads the entropy of metrics/
    "networks": 1, "losses": 1, "metrics": 1, "planners": 1, "dataset_conversion": 1, "uncertainty_prompting": 1,
    "trainers": 2, "inference": 2, "evaluation": 2,
    "launch": 3, "api": 4, "cli": 5,
}
# edges forbidden within one layer
SIDEWAYS = {("evaluation", "trainers"), ("evaluation", "inference"), ("inference", "evaluation"),
            ("trainers", "inference"), ("trainers", "evaluation")}


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "calibnet" and len(parts) > 1 else None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def upward_edges() -> list:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        source = relative.parts[0].removesuffix(".py")
        if source == "__init__":
            continue
        for module, line in _imports(path):
            target = _part(module)
            if target is None or target == source:
                continue
            if LAYERS[target] > LAYERS[source] or (source, target) in SIDEWAYS:
                edges.append(f"{relative}:{line} ({source}) imports {module} ({target})")
    return edges


def test_every_package_part_has_a_layer():
    names = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert names - {"__init__"} <= set(LAYERS), sorted(names - {"__init__"} - set(LAYERS))


def test_no_import_runs_back_up_a_stage():
    assert upward_edges() == []


def test_the_check_sees_an_upward_edge(tmp_path, monkeypatch):
    """The walker itself must be able to fail: an evaluation module importing inference is reported."""
    fake = tmp_path / "calibnet"
    (fake / "evaluation").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "evaluation" / "x.py").write_text("def f():\n    from calibnet.inference.predict import load_model\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert upward_edges() == ["evaluation/x.py:2 (evaluation) imports calibnet.inference.predict (inference)"]


MAX_FUNCTION_LINES = 60


def long_functions(package: Path = PACKAGE) -> list:
    """Functions (and methods) longer than MAX_FUNCTION_LINES lines, docstring included."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(package)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    assert long_functions() == []


def test_the_length_check_sees_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert long_functions(tmp_path) == [f"m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]

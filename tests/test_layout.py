"""The code's layout: no import circle among loraflow's modules, shared tasks import no approach, and only
the dispatch module (tasks/approaches.py) and the two training flows branch on the approach's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"loraflow": REPO / "loraflow", "loraflow.flows": REPO / "flows", "loraflow.tasks": REPO / "tasks"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts]).removesuffix(".__init__")
            found[name] = path
    return found


def _module_level_imports(path: Path, known: set[str]) -> set[str]:
    """loraflow modules imported at the top of `path` (not inside functions: those run on demand)."""
    imported = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        imported |= {n for n in names if n in known}
    return imported


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child) :] + [child]
            if child not in state and (found := visit(child)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_another_in_a_circle() -> None:
    modules = _modules()
    graph = {name: _module_level_imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert len(graph) > 30 and _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"
    # the check finds a circle when there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_shared_tasks_import_no_approach() -> None:
    modules = _modules()
    approaches = {
        n for n in modules if n.startswith(("loraflow.tasks.generative", "loraflow.tasks.classifier"))
    }
    shared = {
        n: p
        for n, p in modules.items()
        if n.startswith("loraflow.tasks.") and n not in approaches and n != "loraflow.tasks.approaches"
    }
    for name, path in shared.items():
        assert not (_module_level_imports(path, set(modules)) & approaches), name
        assert "tasks.generative" not in path.read_text() and "tasks.classifier" not in path.read_text(), name
    for name in approaches:  # an approach does not import the other one
        other = "classifier" if ".generative" in name else "generative"
        assert f"tasks.{other}" not in modules[name].read_text(), name


def test_only_the_dispatch_module_and_the_two_flows_branch_on_the_approach() -> None:
    allowed = {
        REPO / "tasks" / "approaches.py",
        REPO / "flows" / "generative.py",
        REPO / "flows" / "classifier.py",
    }
    branching = re.compile(r"approach\W*\s*[!=]=\s*[\"']|[\"']\s*[!=]=\s*[\w.]*approach\b")
    offenders = [
        str(path.relative_to(REPO))
        for path in _modules().values()
        if path not in allowed and branching.search(path.read_text())
    ]
    assert offenders == []


def test_the_data_only_flows_import_no_torch_and_only_training_imports_the_training_stack() -> None:
    """validate-data runs on a CPU pool without the GPU stack: importing it (and quieting the libraries, as
    every command does) must not load torch. peft, trl and the Trainer (seconds of imports) load when a fit
    starts: the flows, `loraflow serve` and the CLI import without them, so predict, validate, review, a
    retrain with no new data and a cached run never wait for them (tasks/approaches.py, TRAINING)."""
    import subprocess
    import sys

    training = ("peft", "trl", "transformers.trainer", "bitsandbytes", "loraflow.tasks.lora")
    flows = ", ".join(
        f"loraflow.flows.{name}" for name in ("generative", "classifier", "predict", "retrain", "sweep")
    )
    code = (
        "import sys, loraflow.flows.validate, loraflow.cli, loraflow.console as c; c.quiet_library_logs(); "
        "print('torch' in sys.modules); "
        f"import {flows}, loraflow.serve; print(*sorted(set({training!r}) & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["False", ""], done.stdout + done.stderr


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_bitsandbytes_kernels_advice_is_logged_only_for_a_quantised_base(quantization: str) -> None:
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes warns at import that its optional
    CPU 4-bit kernels are missing: in every run's log (the Prefect UI's too), whatever the run. The fit
    imports the training stack under `without_kernels_advice`; the 4bit case shows the warning is real."""
    import subprocess
    import sys

    code = (
        "import logging; seen = []; handler = logging.Handler(); handler.emit = seen.append; "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').addHandler(handler); "
        "from loraflow.console import without_kernels_advice\n"
        f"with without_kernels_advice({quantization!r}): import loraflow.tasks.generative.train\n"
        "print(sum('kernels-community' in r.getMessage() for r in seen))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0" if quantization == "none" else "1"], done.stdout + done.stderr

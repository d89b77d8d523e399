"""The package installs cleanly: a wheel built from the checkout, installed into a fresh venv outside it,
runs `loraflow validate` on its packaged example from another folder, beside a user's own `tasks` package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.flow
REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "loraflow", "flows", "tasks", "examples", "data_contracts")


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_wheel_runs_the_packaged_example_outside_the_checkout(tmp_path: Path) -> None:
    source = tmp_path / "source"  # built from a copy: setuptools leaves build/ and *.egg-info behind
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        tmp_path,
        source,
        cwd=tmp_path,
    )
    [wheel] = tmp_path.glob("loraflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "loraflow/tasks/generative/train.py" in names and "loraflow/flows/generative.py" in names
    assert "loraflow/examples/geo/config.yaml" in names and "loraflow/data_contracts/geo.json" in names
    assert not [n for n in names if n.startswith(("tasks/", "flows/"))]  # no top-level packages to collide

    # A fresh venv that sees this environment's dependencies (not its editable loraflow) through a .pth;
    # this environment's pip installs into it (`pip --python`), so the venv needs no pip of its own.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    target = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (target / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel, cwd=tmp_path)

    user = tmp_path / "user-project"  # a user's own Prefect repository, with its own `tasks` package
    (user / "tasks").mkdir(parents=True)
    (user / "tasks" / "__init__.py").write_text("MINE = True\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFECT_API_URL")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    where = _run(
        python,
        "-c",
        "import tasks, loraflow.tasks.ingest as i; assert tasks.MINE; print(i.__file__)",
        cwd=user,
        env=env,
    )
    assert where.startswith(str(target)), where  # the installed copy, not the checkout
    config = Path(
        _run(python, "-c", "import loraflow.cli as c; print(c.DEMO_CONFIG)", cwd=user, env=env).strip()
    )
    assert config.is_relative_to(target) and config.is_file()
    out = _run(
        env_dir / "bin" / "loraflow",
        "validate",
        config,
        "--set",
        f"output_dir={user / 'runs'}",
        cwd=user,
        env=env,
    )
    assert "data contract passed" in out
    assert (user / "runs" / "geo" / "work").is_dir()

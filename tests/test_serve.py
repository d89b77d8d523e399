"""`loraflow serve`: a real uvicorn server in a subprocess, on a free port, serving a tiny trained model from
a registry link, talked to over HTTP: answers equal `loraflow predict`'s, bad requests get a 422 naming the
problem, and a promotion during a stream of requests swaps the model without a failed or mixed answer."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from loraflow.cli import main
from loraflow.loading import load_config
from loraflow.processes import start_in_own_group, stop_group
from loraflow.tasks.approaches import approach, predict_rows
from loraflow.tasks.generative.merge import merge_adapter
from loraflow.tasks.generative.prepare import prepare_inputs as format_prompts
from loraflow.tasks.generative.train import train_adapter
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.manifest import ModelManifest
from loraflow.tasks.predict import PREDICTED, read_input
from loraflow.tasks.registry import append_history, promote
from loraflow.tasks.serving import load_served
from loraflow.tasks.store import Ref, link_tree
from tests.conftest import write_config
from tests.test_classifier import pair_rows
from tests.test_predict import classifier_model  # noqa: F401 (a fixture: the tiny trained classifier)
from tests.tiny import geo_rows

pytestmark = pytest.mark.flow
TOKEN = "test-token-never-logged"
VERSION_A, VERSION_B = "20260101T000000Z", "20260102T000000Z"
MAX_ROWS, MAX_CHARS, MAX_BODY = 8, 200, 4096
COLUMNS = ["requirement", "sample_data"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    """A tiny generative model trained in-process, promoted as version A of a registry; version B is the
    same model with its LM head scaled (a different model with the same manifest), promoted later."""
    folder = tmp_path_factory.mktemp("serve")
    config = load_config(write_config(folder / "task", tiny_model, registry=str(folder / "models")))
    store, base = str(folder / "store"), Ref(path=str(tiny_model), digest="tiny")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = format_prompts.fn(splits, config.prompt, config.data.answers, store)
    adapter = train_adapter.fn(prompts, base, config.lora, config.train, "float32", store)
    merged = Path(merge_adapter.fn(adapter, base, prompts, config.prompt, "float32", store).path)
    runs = {version: folder / "runs" / version for version in (VERSION_A, VERSION_B)}
    link_tree(merged, runs[VERSION_A] / "merged")
    shutil.copytree(merged, runs[VERSION_B] / "merged")  # a copy: its weights are rewritten below
    weights = runs[VERSION_B] / "merged" / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 3.0
    save_file(tensors, weights, metadata={"format": "pt"})
    (runs[VERSION_A] / "metrics.json").write_text(
        json.dumps({"model": str(tiny_model), "finetuned": {"accuracy": 0.75, "macro_f1": 0.7}, "test": None})
    )
    promote(config, runs[VERSION_A])
    append_history(
        config, {"decision": "promoted", "version": VERSION_A, "challenger": {"run": str(runs[VERSION_A])}}
    )
    return {"config": config, "runs": runs, "link": folder / "models" / config.name / "production"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registry: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`loraflow serve models/<name>/production` as a subprocess, with a token and small request limits."""
    port, log = _free_port(), tmp_path_factory.mktemp("server-log") / "serve.log"
    command = [
        *(sys.executable, "-m", "loraflow.cli", "serve", str(registry["link"]), "--port", str(port)),
        *("--max-rows", str(MAX_ROWS), "--max-chars", str(MAX_CHARS), "--max-body-bytes", str(MAX_BODY)),
        *("--poll-seconds", "0.2"),
        *("--max-batch", "16", "--max-wait-ms", "20"),
    ]
    with open(log, "wb") as out:  # ended with this process, whatever happens to the test session
        process = start_in_own_group(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "LORAFLOW_SERVE_TOKEN": TOKEN}
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if _request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server did not answer in 120 s:\n{log.read_text()}"
            time.sleep(0.2)
        yield {"port": port, "log": log, "process": process}
    finally:
        stop_group(process, grace_seconds=30)


def _request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    chunked: bool = False,
) -> tuple[int, Any]:
    """(status, parsed JSON body) of one HTTP request to the server."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        if chunked:
            connection.request(
                method, path, body=iter([data[:10], data[10:]]), headers=headers, encode_chunked=True
            )
        else:
            connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def _rows(n: int, seed: int) -> list[dict[str, str]]:
    return geo_rows(n, seed=seed).drop(columns=["score"]).to_dict("records")


def _expected(folder: Path, rows: list[dict[str, str]]) -> np.ndarray:
    """The probabilities the approach's scorer gives `rows` with the model in `folder`."""
    manifest = ModelManifest.read(folder)
    scorer = approach(manifest.approach).scorer(folder, manifest)
    return scorer(pd.DataFrame(rows), 16, None)


def test_answers_equal_loraflow_predict(
    server: dict[str, Any], registry: dict[str, Any], tmp_path: Path
) -> None:
    rows = _rows(12, seed=5)
    rows[3] = {"requirement": "am Meer 🌊", "sample_data": "Zürich, Ōsaka", "id": 7}  # other keys ride along
    # loraflow predict's own steps, in-process: read the table as predict reads it, then predict-rows
    table = tmp_path / "rows.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    ref = read_input.fn(str(table), COLUMNS, 0, 1, "utf-8", str(tmp_path / "store"))
    predicted = pd.read_parquet(predict_rows.fn(str(registry["link"]), ref, 16).path)
    labels = ModelManifest.read(registry["link"]).labels

    # three concurrent requests, batched together by the server
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(
                lambda part: _request(server["port"], "POST", "/predict", {"rows": part}),
                [rows[:5], rows[5:9], rows[9:]],
            )
        )
    assert all(status == 200 for status, _ in answers), answers
    assert {body["version"] for _, body in answers} == {VERSION_A}
    served = [p for _, body in answers for p in body["predictions"]]
    assert [p["label"] for p in served] == predicted[PREDICTED].tolist()
    np.testing.assert_allclose(
        [[p["probabilities"][label] for label in labels] for p in served],
        predicted[[f"prob_{label}" for label in labels]].to_numpy(),
        rtol=0,
        atol=1e-6,
    )


def test_health_info_openapi_and_the_token(
    server: dict[str, Any], registry: dict[str, Any], tiny_model: Path
) -> None:
    port = server["port"]
    assert _request(port, "GET", "/health", token=None) == (200, {"status": "ok", "version": VERSION_A})
    status, info = _request(port, "GET", "/info")
    assert status == 200
    assert (info["approach"], info["labels"], info["columns"], info["version"]) == (
        "generative",
        ["0", "1"],
        COLUMNS,
        VERSION_A,
    )
    assert info["following"].endswith("production") and info["settings"]["max_rows"] == MAX_ROWS
    # the registry's history names the version's run, whose metrics.json has the model and its metrics
    assert info["run"] == str(registry["runs"][VERSION_A]) and info["base_model"] == str(tiny_model)
    assert info["metrics"] == {"dev": {"accuracy": 0.75, "macro_f1": 0.7}}
    status, schema = _request(port, "GET", "/openapi.json")
    row = schema["components"]["schemas"]["Row"]
    assert status == 200 and set(row["required"]) == set(COLUMNS)
    assert {"/predict", "/health", "/info"} <= set(schema["paths"])
    for path, method, body in (("/predict", "POST", {"rows": _rows(1, 0)}), ("/info", "GET", None)):
        for token in (None, "wrong"):
            status, answer = _request(port, method, path, body, token=token)
            assert status == 401 and "LORAFLOW_SERVE_TOKEN" in answer["message"], (path, token, answer)
    assert TOKEN not in server["log"].read_text()


GOOD = {"requirement": "on the seashore", "sample_data": "Lima, Oslo"}
BAD_REQUESTS = [  # (body, or raw bytes; the field named; words of the problem)
    ({"rows": [{"requirement": "x"}]}, "rows[0].sample_data", "missing"),
    ({"rows": [{"requirement": "x", "sample_dta": "y"}]}, "rows[0].sample_data", "did you mean 'sample_dta'"),
    ({"rows": [GOOD | {"requirement": ""}]}, "rows[0].requirement", "blank"),
    (
        {"rows": [GOOD, GOOD | {"sample_data": "x" * (MAX_CHARS + 1)}]},
        "rows[1].sample_data",
        "longer than 200",
    ),
    ({"rows": [GOOD | {"requirement": 42}]}, "rows[0].requirement", "got int 42"),
    ({"rows": [GOOD | {"requirement": None}]}, "rows[0].requirement", "got null"),
    ({"rows": [GOOD | {"requirement": ["a", "b"]}]}, "rows[0].requirement", "got list"),
    ({"rows": [GOOD | {"requirement": {"text": "a"}}]}, "rows[0].requirement", "got dict"),
    ({"rows": [GOOD | {"sample_data": True}]}, "rows[0].sample_data", "got bool"),
    ({"rows": [GOOD] * (MAX_ROWS + 1)}, "rows", f"more than {MAX_ROWS} rows"),
    ({"rows": []}, "rows", "no rows"),
    ({}, "rows", "rows is missing"),
    ({"rows": "on the seashore"}, "rows", "not a list"),
    ({"rows": ["on the seashore"]}, "rows[0]", "not a JSON object"),
    ([GOOD], "body", "not a JSON object"),
    ({"rows": [GOOD], "model": "other"}, "model", "unknown field"),
    (b'{"rows": [{"requirement": ', "body", "not valid JSON"),
    (b"", "body", "not a JSON object"),
    (
        {"rows": [GOOD] * 4 + [{"requirement": "x" * MAX_CHARS}] * 20},
        "body",
        f"larger than {MAX_BODY:,} bytes",
    ),
    ("chunked", "body", f"larger than {MAX_BODY:,} bytes"),
]


def test_twenty_bad_requests_each_get_a_422_naming_the_problem(server: dict[str, Any]) -> None:
    port = server["port"]
    assert len(BAD_REQUESTS) == 20
    for body, field, words in BAD_REQUESTS:
        if body == "chunked":  # no Content-Length: the body is counted as it arrives
            big = json.dumps({"rows": [{"requirement": "y" * MAX_CHARS}] * 30}).encode()
            status, answer = _request(port, "POST", "/predict", raw=big, chunked=True)
        elif isinstance(body, bytes):
            status, answer = _request(port, "POST", "/predict", raw=body)
        else:
            status, answer = _request(port, "POST", "/predict", body)
        assert status == 422, (body, status, answer)
        problem = answer["detail"][0]
        assert problem["field"] == field and words in problem["problem"] and problem["fix"], (body, answer)
        assert field in answer["message"]
    # every problem of a request at once, and the server still answers
    status, answer = _request(
        port, "POST", "/predict", {"rows": [{"requirement": 1}, GOOD, {"sample_data": " \t\n"}]}
    )
    fields = [p["field"] for p in answer["detail"]]
    assert status == 422 and fields == [
        "rows[0].requirement",
        "rows[0].sample_data",
        "rows[2].requirement",
        "rows[2].sample_data",
    ]
    assert _request(port, "POST", "/predict", {"rows": [GOOD]})[0] == 200
    assert server["process"].poll() is None


def test_a_promotion_during_a_stream_of_requests_swaps_without_a_failed_or_mixed_answer(
    server: dict[str, Any], registry: dict[str, Any]
) -> None:
    port, rows = server["port"], _rows(3, seed=11)
    runs = registry["runs"]
    expected = {version: _expected(runs[version] / "merged", rows) for version in (VERSION_A, VERSION_B)}
    assert np.abs(expected[VERSION_A] - expected[VERSION_B]).max() > 1e-3  # the two answers differ
    labels = ModelManifest.read(runs[VERSION_A] / "merged").labels
    stop, seen_b = threading.Event(), threading.Event()

    def stream() -> list[tuple[int, str | None, np.ndarray | None]]:
        answers = []
        while not stop.is_set():
            status, body = _request(port, "POST", "/predict", {"rows": rows})
            if status != 200:
                answers.append((status, None, None))
                continue
            got = np.array([[p["probabilities"][label] for label in labels] for p in body["predictions"]])
            answers.append((status, body["version"], got))
            if body["version"] == VERSION_B:
                seen_b.set()
        return answers

    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream) for _ in range(4)]
        time.sleep(1.0)
        promote(registry["config"], runs[VERSION_B])  # what the retrain flow does when a challenger wins
        assert seen_b.wait(60), server["log"].read_text()
        time.sleep(0.5)
        stop.set()
        answers = [s.result() for s in streams]
    every = [a for per_client in answers for a in per_client]
    assert [a for a in every if a[0] != 200] == []  # zero failed requests
    assert {a[1] for a in every} == {VERSION_A, VERSION_B}
    for _, version, got in every:  # every answer wholly from the version it names
        np.testing.assert_allclose(got, expected[version], rtol=0, atol=1e-6)
    for per_client in answers:  # once a client is answered by B, its next requests are too
        versions = [a[1] for a in per_client]
        assert VERSION_A not in versions[versions.index(VERSION_B) :] if VERSION_B in versions else True
    status, info = _request(port, "GET", "/info")
    assert (info["version"], info["swaps"]) == (VERSION_B, 1)
    deadline = time.monotonic() + 10  # the old model is released once its last batch is answered
    while f"released version {VERSION_A}" not in server["log"].read_text():
        assert time.monotonic() < deadline, server["log"].read_text()
        time.sleep(0.2)


def test_a_classifier_is_served_by_the_scorer_predict_uses(classifier_model: Path, tmp_path: Path) -> None:  # noqa: F811
    """The other approach, in-process: the served classifier's probabilities are predict-rows' own."""
    rows = pair_rows(7, seed=2).drop(columns=["relation"])
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    predicted = pd.read_parquet(
        predict_rows.fn(str(classifier_model), Ref(path=str(tmp_path / "rows.parquet"), digest="x"), 4).path
    )
    served = load_served(classifier_model)
    labels = served.manifest.labels
    assert served.info["approach"] == "classifier" and served.info["columns"] == ["sentence_a", "sentence_b"]
    np.testing.assert_allclose(
        served.probabilities(rows, 16), predicted[[f"prob_{label}" for label in labels]], rtol=0, atol=1e-6
    )


def test_serving_a_folder_that_is_not_a_model_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("loraflow: error: ") and "not a loraflow model" in error and "Traceback" not in error
    )

"""What users watch and keep: the training progress artifact, the run-folder link, plots, the model card,
and `loraflow runs` / `loraflow compare` over two real tiny runs."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
from pathlib import Path

import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from loraflow.cli import main
from loraflow.config import HubSettings
from loraflow.errors import ModelError
from loraflow.flows.generative import train_generative
from loraflow.loading import load_config
from loraflow.tasks.card import front_matter, render_model_card
from loraflow.tasks.classifier.merge import card_usage
from loraflow.tasks.hub import push_to_hub
from loraflow.tasks.plots import PLOTS
from tests.conftest import write_config

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def two_runs(prefect_server: None, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """Two finished runs of one config (the second with another learning rate), and their flow runs."""
    folder = tmp_path_factory.mktemp("monitor")
    path = write_config(folder / "task", tiny_model, train={"max_steps": 6, "logging_steps": 1})
    states = [
        train_generative(load_config(path, [f"train.lr={lr}"]), return_state=True) for lr in (0.01, 0.02)
    ]
    return {"config": path, "runs": [Path(s.result()) for s in states], "states": states}


def _scalars(path: Path, tag: str) -> list[float]:
    """A scalar series from a TensorBoard event file (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    values, data = [], path.read_bytes()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        values += [v.simple_value for v in event.summary.value if v.tag == tag]
    return values


def _artifacts(state: object) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )


def test_training_progress_is_an_artifact_updated_while_training(two_runs: dict) -> None:
    artifacts = _artifacts(two_runs["states"][0])
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert progress.key == "training-progress" and progress.data == 100.0
    assert progress.description.startswith("step 6/6 · loss ")  # the last update, at the end
    assert progress.updated > progress.created  # created at step 0, then updated
    [link] = [a for a in artifacts if a.key == "tiny-geo-run-folder"]  # a link artifact (markdown type)
    assert two_runs["runs"][0].as_uri() in link.data


def test_plots_are_pngs_referenced_from_the_report_and_tensorboard_has_the_loss(two_runs: dict) -> None:
    run = two_runs["runs"][0]
    [events] = (run / "tensorboard").rglob("events.out.tfevents.*")
    assert len(_scalars(events, "train/loss")) == 6  # logging_steps 1, six steps
    curve = json.loads((run / "metrics.json").read_text())["train"]["selection"]["curve"]
    assert [p["step"] for p in curve] == [2, 4, 6]  # every 25% of 6 steps, which the Trainer rounds up to 2
    assert _scalars(events, "eval/macro_f1") == pytest.approx([p["macro_f1"] for p in curve])
    report = (run / "report.md").read_text()
    for relative in PLOTS.values():
        png = run / relative
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
            assert image.size[0] > 200 and image.size[1] > 200
        assert f"]({relative})" in report
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [metrics[kind]["answer_loss"] for kind in ("baseline", "finetuned")]  # the dashed lines
    assert all(loss > 0 for loss in losses)
    assert f"Dev answer loss (−log p(gold answer), mean per row): zero-shot {losses[0]:.4f}" in report


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img\b[^>]*\bsrc=[\"']([^\"']+)")


def test_the_report_artifact_read_back_from_the_server_shows_every_plot_inline(two_runs: dict) -> None:
    """The Prefect UI cannot fetch files from the run folder: every image of the report artifact is a data URI
    (or an http(s) URL) that decodes to a valid image, small enough to live in Prefect's database."""
    [report] = [a for a in _artifacts(two_runs["states"][0]) if a.key == "tiny-geo-report"]
    sources = [link or src for link, src in IMAGE.findall(report.data)]
    assert len(sources) == len(PLOTS)  # the loss curve, the confusion matrix, per-class F1
    for source in sources:
        assert source.startswith(("data:image/png;base64,", "data:image/svg+xml", "http://", "https://"))
        assert source.startswith("data:image/png;base64,"), source[:40]  # what loraflow embeds
        png = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
        with Image.open(io.BytesIO(png)) as image:
            assert image.mode == "P" and 300 < image.size[0] < 1000 and image.size[1] > 200
    assert sum(len(s) for s in sources) < 60_000  # the three, base64, in the artifact's database row
    on_disk = (two_runs["runs"][0] / "report.md").read_text()
    assert "data:" not in on_disk and all(f"]({relative})" in on_disk for relative in PLOTS.values())


def test_the_model_card_names_the_base_model_and_the_metrics(two_runs: dict, tiny_model: Path) -> None:
    card = (two_runs["runs"][0] / "merged" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(tiny_model) and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "other"
    [result] = meta["model-index"][0]["results"]
    assert {m["type"] for m in result["metrics"]} == {"accuracy", "f1"}
    assert "## Training config" in card and "sha256" in card

    config = load_config(two_runs["config"]).model_copy(update={"approach": "classifier", "prompt": None})
    metrics = {
        "model": "acme/base",
        "finetuned": {"accuracy": 0.9, "macro_f1": 0.8, "kind": "finetuned"},
        "baseline": None,
        "labels": ["a", "b"],
        "n_dev": 10,
        "n_train": 40,
        "data": {"sources": {"/x/train.tsv": "abc"}},
    }
    usage = card_usage(sentence_pair=False)  # what the classifier's merge records in loraflow.json
    classifier = front_matter(render_model_card(config, metrics, "acme/base", "apache-2.0", usage))
    assert classifier["pipeline_tag"] == "text-classification" and classifier["license"] == "apache-2.0"


def test_runs_lists_newest_first_and_compare_shows_what_differs(
    two_runs: dict, capsys: pytest.CaptureFixture
) -> None:
    first, second = two_runs["runs"]
    assert main(["runs", str(two_runs["config"])]) == 0
    table = capsys.readouterr().out
    assert table.index(second.name) < table.index(first.name)  # newest first
    assert table.count("| generative | 6 |") == 2

    assert main(["compare", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "| train.lr | 0.01 | 0.02 |" in out
    assert "| train steps | 6 | 6 |" in out and "| fine-tuned macro-F1 |" in out
    assert "| model.name |" not in out  # only what differs

    assert main(["compare", str(first), str(first.parent)]) == 2
    assert "is not a loraflow run folder" in capsys.readouterr().err


def test_push_to_hub_uploads_the_merged_folder_with_the_token_from_the_environment(
    two_runs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never against the real hub: HfApi's network calls are replaced by recorders."""
    from huggingface_hub import HfApi

    calls: dict[str, dict] = {}
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.update(create=kw | {"id": repo_id})
    )
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, **kw: calls.update(upload=kw | {"token": self.token}) or "https://hub.example/commit/1",
    )
    run = two_runs["runs"][0]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelError, match="no token is set: export HF_TOKEN"):
        push_to_hub.fn(str(run), HubSettings(repo_id="me/tiny-geo"))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_for_this_test")
    assert push_to_hub.fn(str(run), HubSettings(repo_id="me/tiny-geo")) == "https://hub.example/commit/1"
    assert calls["create"] == {"id": "me/tiny-geo", "private": True, "exist_ok": True, "repo_type": "model"}
    upload = calls["upload"]
    assert upload["folder_path"] == str(run / "merged") and (run / "merged" / "README.md").is_file()
    assert upload["token"] == "hf_fake_for_this_test" and upload["repo_id"] == "me/tiny-geo"

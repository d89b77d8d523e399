"""Quality, measured honestly: the classical baseline (fitted on train only, the same as scikit-learn's own
fit, in every report surface), model selection on dev during training (the best step of a planted curve is
the one kept, early stopping stops, a resumed run keeps the best so far) and a test split that nothing is
selected on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from transformers import TrainerCallback

import loraflow.tasks.classifier.train as classifier_train
import loraflow.tasks.generative.train as generative_train
from loraflow.config import DataSettings, LoraSettings, TrainSettings
from loraflow.flows.generative import train_generative
from loraflow.loading import load_config
from loraflow.runs import compare_runs, runs_table
from loraflow.tasks.classical import evaluate_classical, fit_classical, input_text
from loraflow.tasks.generative.prepare import COMPLETION, PROMPT, prepare_inputs, read_prompts
from loraflow.tasks.generative.train import DevRows, fit_adapter
from loraflow.tasks.ingest import ingest_table, read_split
from loraflow.tasks.lora import selection_record, stopped_below
from loraflow.tasks.metrics import read_evaluation
from loraflow.tasks.report import metrics_table, verdict
from tests.conftest import write_config
from tests.test_classifier import write_pair_config

pytestmark = pytest.mark.flow


# --- the classical baseline -------------------------------------------------------------------------------


def _texts(tmp_path: Path) -> tuple[Path, Path]:
    """Train rows whose words carry the label, and dev rows that add a dev-only word per label: a fit that
    saw dev would learn those words and score dev perfectly."""
    rng = np.random.default_rng(0)
    words = {"pos": ["good", "fine", "nice"], "neg": ["bad", "poor", "dull"]}
    train = [
        {"review": " ".join(rng.choice(words[label], 3)) + " film plot", "label": label}
        for label in ["pos", "neg"] * 20
    ]
    # Dev: the train words are swapped between the labels; only the dev-only word tells the label.
    dev = [
        {
            "review": f"{' '.join(rng.choice(words['neg' if label == 'pos' else 'pos'], 2))} {extra}",
            "label": label,
        }
        for label, extra in [("pos", "zebra"), ("neg", "walrus")] * 6
    ]
    train_path, dev_path = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    pd.DataFrame(train).to_csv(train_path, sep="\t", index=False)
    pd.DataFrame(dev).to_csv(dev_path, sep="\t", index=False)
    return train_path, dev_path


def test_the_classical_baseline_is_fitted_on_train_only_and_matches_scikit_learn(tmp_path: Path) -> None:
    train_path, dev_path = _texts(tmp_path)
    data = DataSettings(train=train_path, dev=dev_path, text_columns=["review"], label_column="label")
    store = str(tmp_path / "store")
    splits = ingest_table.fn(data, ["review"], store)
    metrics, predictions = read_evaluation(evaluate_classical.fn(splits, ["review"], None, store))
    assert metrics["kind"] == "classical" and metrics["eval"]["model"] == "TF-IDF + logistic regression"
    assert metrics["accuracy"] == 0.0  # the dev-only words were never seen: the swapped train words decide

    train, dev = read_split(splits, "train"), read_split(splits, "dev")
    fitted = fit_classical(input_text(train, ["review"], None), train["label"].tolist())
    vocabulary = fitted.named_steps["tfidfvectorizer"].vocabulary_
    assert "good" in vocabulary and not {"zebra", "walrus"} & set(vocabulary)

    # The same rows through scikit-learn directly: the same probabilities.
    direct_vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    direct = LogisticRegression(max_iter=2000, random_state=0, class_weight="balanced").fit(
        direct_vectorizer.fit_transform(train["review"]), train["label"]
    )
    expected = direct.predict_proba(direct_vectorizer.transform(dev["review"]))
    labels = ["neg", "pos"]
    got = predictions[[f"prob_{label}" for label in labels]].to_numpy()
    np.testing.assert_allclose(got, expected[:, [list(direct.classes_).index(x) for x in labels]], atol=1e-9)

    # A leaky fit (train + dev) would have scored dev perfectly: the planted words do leak when seen.
    leaky = fit_classical(
        input_text(pd.concat([train, dev]), ["review"], None), pd.concat([train, dev])["label"].tolist()
    )
    assert (leaky.predict(dev["review"]) == dev["label"]).mean() > 0.9


def test_the_classical_baseline_reads_the_rendered_template(tmp_path: Path) -> None:
    frame = pd.DataFrame({"title": ["A {b}"], "body": ["x"]})
    assert input_text(frame, ["title", "body"], "{title}: {body}") == ["A {b}: x"]
    assert input_text(frame, ["title", "body"], None) == ["A {b}\n\nx"]


def _table_artifact(key: str) -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        [artifact] = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_every_report_surface_shows_the_classical_baseline_and_the_test_split(
    prefect_server: None, tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    path = write_config(
        tmp_path / "task", tiny_model, data={"test_fraction": 0.25}, train={"max_steps": 2, "eval_steps": 1}
    )
    run = Path(train_generative(load_config(path)))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classical"]["kind"] == "classical"
    assert metrics["n_test"] == 12 and metrics["n_train"] == 36  # 25% of the 48 train rows held out
    assert {name: m["kind"] for name, m in metrics["test"].items()} == {
        "baseline": "zero-shot",
        "classical": "classical",
        "finetuned": "finetuned",
    }
    assert sum(map(sum, metrics["test"]["finetuned"]["confusion"])) == 12
    selection = metrics["train"]["selection"]
    assert [p["step"] for p in selection["curve"]] == [1, 2] and selection["kept"] == "best"

    report = (run / "report.md").read_text()
    classical = "| classical (TF-IDF + logistic regression) |"
    assert classical in report and "test macro-F1" in report
    assert "Dev macro-F1 during training:" in report
    card = (run / "merged" / "README.md").read_text()
    assert classical in card and "never used to select anything" in card
    assert classical in metrics_table(metrics)  # the CLI's closing table
    assert "classical F1" in runs_table(load_config(path))
    assert "| classical macro-F1 |" in compare_runs(str(run), str(run))
    rows = _table_artifact("tiny-geo-metrics")
    assert [row["model"] for row in rows] == [
        "zero-shot tiny-llama0",
        "classical (TF-IDF + logistic regression)",
        "fine-tuned tiny-llama0 (LoRA r=4)",
    ]
    assert all("test_macro_f1" in row for row in rows)
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert {"baseline_predicted", "classical_predicted"} <= set(predictions.columns)
    assert len(pd.read_parquet(run / "test_predictions.parquet")) == 12
    assert (run / "data" / "test.parquet").is_file()


def test_the_report_says_plainly_when_the_fine_tune_loses_to_the_classical_baseline() -> None:
    def scored(f1: float, kind: str) -> dict[str, Any]:
        return {"kind": kind, "macro_f1": f1, "accuracy": f1}

    metrics = {
        "approach": "generative",
        "classical": scored(0.9, "classical"),
        "finetuned": scored(0.6, "finetuned"),
        "test": None,
        "train": {"selection": {"kept": "best"}},
    }
    said = verdict(metrics)
    assert said[0].startswith("The fine-tuned model does not beat the classical baseline")
    assert "0.600 vs 0.900" in said[0] and "approach: classifier" in said[0] and "train.epochs" in said[0]
    assert "optimistic" in said[1] and "data.test" in said[1]
    # With a test split the comparison is made there, and the dev score needs no warning.
    metrics["test"] = {"classical": scored(0.5, "classical"), "finetuned": scored(0.7, "finetuned")}
    assert verdict(metrics) == []


# --- model selection during training ----------------------------------------------------------------------


def _lora_digest(model: Any) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "score" in name:
            digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class _Recorder(TrainerCallback):
    """The LoRA weights at each evaluation, by step; the planted curve reads the step being evaluated."""

    def __init__(self) -> None:
        self.weights: dict[int, str] = {}
        self.step = 0

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (transformers' signature)
        self.step = state.global_step

    def on_evaluate(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        self.weights[state.global_step] = _lora_digest(model)


def _plant(monkeypatch: pytest.MonkeyPatch, module: Any, curve: dict[int, float]) -> _Recorder:
    """Make `module`'s evaluations during training report `curve[step]` as dev macro-F1."""
    recorder = _Recorder()
    real = module.dev_metrics
    callbacks = module.training_callbacks

    def planted(gold: Any, scores: Any, loss: float) -> dict[str, float]:
        f1 = curve[recorder.step]
        return real(gold, scores, loss) | {"macro_f1": f1, "selection_score": f1}

    monkeypatch.setattr(module, "dev_metrics", planted)
    monkeypatch.setattr(module, "training_callbacks", lambda train: [*callbacks(train), recorder])
    return recorder


@pytest.fixture
def geo(tmp_path: Path, tiny_model: Path) -> tuple[Dataset, DevRows, Any, str]:
    """The tiny geo task's train rows, its dev rows as training scores them, the prompts ref, the store."""
    config = load_config(write_config(tmp_path / "task", tiny_model, data={"test_fraction": 0.25}))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)
    frame = read_prompts(prompts, "train")
    return (
        Dataset.from_pandas(frame[[PROMPT, COMPLETION]], preserve_index=False),
        DevRows.read(prompts),
        prompts,
        store,
    )


SELECTING = TrainSettings(max_steps=6, eval_steps=1, batch_size=8, lr=0.01, logging_steps=1, max_length=128)
CURVE = {1: 0.2, 2: 0.5, 3: 0.9, 4: 0.4, 5: 0.6, 6: 0.3}  # the best step is 3, not the last


def test_the_best_dev_step_of_a_planted_curve_is_the_one_kept(
    geo: tuple, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, dev, _, _ = geo
    recorder = _plant(monkeypatch, generative_train, CURVE)
    trainer, _ = fit_adapter(
        dataset, str(tiny_model), LoraSettings(r=4), SELECTING, "float32", tmp_path / "ck", dev
    )
    assert sorted(recorder.weights) == [1, 2, 3, 4, 5, 6] and len(set(recorder.weights.values())) == 6
    assert trainer.state.best_global_step == 3
    assert _lora_digest(trainer.model) == recorder.weights[3]  # the model saved and merged is step 3's
    record = selection_record(trainer.state, True)
    assert record["kept_step"] == 3 and record["best_macro_f1"] == 0.9 and not record["stopped_early"]
    assert [p["macro_f1"] for p in record["curve"]] == list(CURVE.values())

    # select_best: false keeps the last step, with the same curve recorded.
    recorder = _plant(monkeypatch, generative_train, CURVE)
    last = SELECTING.model_copy(update={"select_best": False})
    trainer, _ = fit_adapter(
        dataset, str(tiny_model), LoraSettings(r=4), last, "float32", tmp_path / "ck2", dev
    )
    assert _lora_digest(trainer.model) == recorder.weights[6]
    assert selection_record(trainer.state, False)["kept_step"] == 6


def test_early_stopping_stops_when_dev_macro_f1_stops_improving(
    geo: tuple, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, dev, _, _ = geo
    recorder = _plant(monkeypatch, generative_train, {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.6, 5: 0.9, 6: 0.9})
    patient = SELECTING.model_copy(update={"early_stopping_patience": 2})
    trainer, _ = fit_adapter(
        dataset, str(tiny_model), LoraSettings(r=4), patient, "float32", tmp_path / "ck", dev
    )
    assert trainer.state.global_step == 4  # steps 3 and 4 did not beat step 2: stopped before 5
    assert _lora_digest(trainer.model) == recorder.weights[2]
    record = selection_record(trainer.state, True)
    assert record["stopped_early"] and record["kept_step"] == 2


def test_a_floor_on_dev_macro_f1_stops_a_run_that_is_still_below_it(
    geo: tuple, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.stop_below (a sweep's median rule): at the first evaluation at or past half the run, the best so
    far (0.5 at step 2, not the 0.4 of step 3) is below the floor of 0.6: training stops, the best is kept."""
    dataset, dev, _, _ = geo
    recorder = _plant(monkeypatch, generative_train, {1: 0.3, 2: 0.5, 3: 0.4, 4: 0.9, 5: 0.9, 6: 0.9})
    floored = SELECTING.model_copy(update={"stop_below": {0.5: 0.6}})
    trainer, _ = fit_adapter(
        dataset, str(tiny_model), LoraSettings(r=4), floored, "float32", tmp_path / "ck", dev
    )
    assert trainer.state.global_step == 3 and _lora_digest(trainer.model) == recorder.weights[2]
    record = selection_record(trainer.state, True, stopped_below(trainer))
    assert record["stopped_below"] == {"step": 3, "share": 0.5, "floor": 0.6, "best_macro_f1": 0.5}
    assert record["max_steps"] == 6 and record["kept_step"] == 2

    # Above the floor by then, the run goes on to its last step.
    passing = SELECTING.model_copy(update={"stop_below": {0.5: 0.45}})
    trainer, _ = fit_adapter(
        dataset, str(tiny_model), LoraSettings(r=4), passing, "float32", tmp_path / "ck2", dev
    )
    assert trainer.state.global_step == 6 and stopped_below(trainer) is None


def test_the_classifier_selects_its_best_step_with_the_trainers_own_evaluation(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraflow.tasks.classifier.prepare import prepare_inputs as map_labels
    from loraflow.tasks.classifier.scoring import classifier_tokenizer

    config = load_config(write_pair_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    encoded = map_labels.fn(splits, config.input_columns, config.classifier, store)
    tokenizer = classifier_tokenizer(str(tiny_model))
    train, _ = classifier_train.labelled_tokens(tokenizer, read_split(encoded, "train"), 48)
    dev, _ = classifier_train.labelled_tokens(tokenizer, read_split(encoded, "dev"), 48)
    recorder = _plant(monkeypatch, classifier_train, CURVE)
    settings = SELECTING.model_copy(update={"batch_size": 4, "max_length": 48})
    labels = ["contradiction", "entailment", "neutral"]
    trainer, _ = classifier_train.fit_classifier(
        train, str(tiny_model), labels, LoraSettings(r=4), settings, None, "float32", tmp_path / "ck", dev
    )
    assert sorted(recorder.weights) == [1, 2, 3, 4, 5, 6] and len(set(recorder.weights.values())) == 6
    assert trainer.state.best_global_step == 3 and _lora_digest(trainer.model) == recorder.weights[3]
    curve = selection_record(trainer.state, True)["curve"]
    assert [p["macro_f1"] for p in curve] == list(CURVE.values()) and all(p["loss"] > 0 for p in curve)


class _CrashAt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == 5:
            raise RuntimeError("simulated crash at step 5")


def test_a_resumed_run_keeps_the_best_so_far(
    geo: tuple, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, dev, _, _ = geo
    recorder = _plant(monkeypatch, generative_train, CURVE)
    callbacks = generative_train.training_callbacks
    monkeypatch.setattr(generative_train, "training_callbacks", lambda train: [*callbacks(train), _CrashAt()])
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_adapter(dataset, str(tiny_model), LoraSettings(r=4), SELECTING, "float32", tmp_path / "ck", dev)
    assert {p.name for p in (tmp_path / "ck").glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-5"}

    monkeypatch.setattr(generative_train, "training_callbacks", callbacks)  # no crash; the same planted curve
    trainer, resumed = fit_adapter(
        dataset, str(tiny_model), LoraSettings(r=4), SELECTING, "float32", tmp_path / "ck", dev
    )
    assert resumed == 5 and trainer.state.global_step == 6
    assert trainer.state.best_global_step == 3 and _lora_digest(trainer.model) == recorder.weights[3]


def test_the_test_split_is_never_scored_during_training(
    geo: tuple, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, dev, prompts, _ = geo
    seen: list[str] = []
    real = generative_train.score_labels

    def recording(model: Any, tokenizer: Any, rows: list, answers: list, batch_size: int = 16) -> np.ndarray:
        seen.extend(json.dumps(r) for r in rows)
        return real(model, tokenizer, rows, answers, batch_size)

    monkeypatch.setattr(generative_train, "score_labels", recording)
    fit_adapter(dataset, str(tiny_model), LoraSettings(r=4), SELECTING, "float32", tmp_path / "ck", dev)
    test = {json.dumps(r) for r in read_prompts(prompts, "test")[PROMPT]}
    assert len(test) == 12 and seen and set(seen) == {json.dumps(r) for r in dev.prompts}
    assert not test & set(seen)

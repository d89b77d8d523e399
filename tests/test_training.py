"""Training, merging and label scoring on a tiny random Llama: the contracts, not just "it runs"."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import loraflow.tasks.generative.train
from loraflow.config import EvalSettings, LoraSettings, PromptSettings, TrainSettings
from loraflow.errors import ConfigError
from loraflow.loading import load_config
from loraflow.tasks.generative.evaluate import evaluate_model
from loraflow.tasks.generative.merge import merge_adapter
from loraflow.tasks.generative.prepare import PROMPT, prepare_inputs, read_answers, read_prompts
from loraflow.tasks.generative.scoring import answer_spans, encode_choices, score_labels
from loraflow.tasks.generative.train import DevRows, fit_adapter, fit_prompts, train_adapter
from loraflow.tasks.ingest import ingest_table
from loraflow.tasks.merging import QUANTIZED_TOLERANCE
from loraflow.tasks.metrics import read_evaluation
from loraflow.tasks.models import device, load_causal_lm, load_tokenizer, quantization_config
from loraflow.tasks.store import Ref
from tests.conftest import write_config

pytestmark = pytest.mark.flow
TRAIN = TrainSettings(max_steps=4, batch_size=8, lr=0.01, save_steps=2, logging_steps=2, max_length=128)


@pytest.fixture
def prepared(tmp_path: Path, tiny_model: Path) -> tuple[Ref, Ref, PromptSettings, str]:
    """Formatted prompts of the tiny geo data, the model ref, the prompt settings and the store."""
    config = load_config(write_config(tmp_path / "task", tiny_model))
    store = str(tmp_path / "store")
    splits = ingest_table.fn(config.data, config.input_columns, store)
    prompts = prepare_inputs.fn(splits, config.prompt, config.data.answers, store)
    return prompts, Ref(path=str(tiny_model), digest="tiny"), config.prompt, store


def test_lora_weights_move_and_base_weights_do_not(prepared: tuple, tmp_path: Path, tiny_model: Path) -> None:
    prompts, model, _, _ = prepared
    frame = read_prompts(prompts, "train")
    dataset = Dataset.from_pandas(frame[[PROMPT, "completion"]], preserve_index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, resumed = fit_adapter(
            dataset, model.path, LoraSettings(r=4), TRAIN, "float32", tmp_path / "ckpt"
        )
    assert not [w for w in caught if "checkpointing" in str(w.message)]  # no deprecation noise in the log
    assert resumed == 0 and trainer.state.global_step == 4
    base = load_file(tiny_model / "model.safetensors")
    moved, kept = 0, 0
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # B starts at zero: any non-zero entry means training moved it
            moved += int(param.detach().abs().sum() > 0)
        elif "lora_" not in name:
            original = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param.detach().cpu(), base[original]), f"base weight {original} changed"
            kept += 1
    assert moved > 0 and kept == len(base)


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_dora_and_rslora_adapters_train_and_merge_into_the_same_model(prepared: tuple, variant: str) -> None:
    prompts, model, prompt, store = prepared
    lora = LoraSettings(r=4, **{variant: True})
    adapter = train_adapter.fn(prompts, model, lora, TRAIN, "float32", store)
    folder = Path(adapter.path) / "adapter"
    assert json.loads((folder / "adapter_config.json").read_text())[variant] is True
    trained = load_file(folder / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in trained.items())
    if variant == "use_dora":  # the magnitude of each adapted weight, learnt apart from its direction
        assert any("lora_magnitude_vector" in name for name in trained)
    merged = merge_adapter.fn(adapter, model, prompts, prompt, "float32", store)
    tokenizer = load_tokenizer(merged.path)
    rows = read_prompts(prompts, "dev")[PROMPT].tolist()
    adapted = PeftModel.from_pretrained(load_causal_lm(model.path, "float32"), str(folder)).eval()
    merged_scores = score_labels(
        AutoModelForCausalLM.from_pretrained(merged.path).eval(), tokenizer, rows, ["No", "Yes"]
    )
    np.testing.assert_allclose(
        merged_scores, score_labels(adapted, tokenizer, rows, ["No", "Yes"]), atol=1e-4
    )
    plain = score_labels(load_causal_lm(model.path, "float32"), tokenizer, rows, ["No", "Yes"])
    assert np.abs(merged_scores - plain).max() > 1e-3


def test_the_quantization_settings_build_the_qlora_config() -> None:
    four = quantization_config("4bit", "float32")
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.float32  # model.dtype (auto: bfloat16 on a GPU that has it)
    assert quantization_config("4bit", "bfloat16").bnb_4bit_compute_dtype == torch.bfloat16
    eight = quantization_config("8bit", "auto", keep_in_full=["score"])
    assert eight.load_in_8bit and eight.llm_int8_skip_modules == ["score"]
    assert quantization_config("none", "auto") is None


def test_quantization_without_bitsandbytes_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'loraflow\[qlora\]'"):
        quantization_config("4bit", "auto")


def test_quantization_that_bitsandbytes_cannot_run_here_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine whose bitsandbytes has no backend for its device: the probe layer's forward fails."""
    import bitsandbytes as bnb

    class NoKernel(torch.nn.Module):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bnb.nn, "Linear4bit", NoKernel)
    version = re.escape(bnb.__version__)
    pattern = (
        rf"bitsandbytes {version} cannot run 4bit on this machine's {device()} \(RuntimeError: no kernel"
    )
    with pytest.raises(ConfigError, match=pattern):
        quantization_config("4bit", "float32")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_trains_on_a_quantised_base_and_merges_into_a_standard_model(
    tmp_path: Path, tiny_model_64: Path, quantization: str
) -> None:
    config = load_config(write_config(tmp_path / "task", tiny_model_64))
    store = str(tmp_path / "store")
    prompts = prepare_inputs.fn(
        ingest_table.fn(config.data, config.input_columns, store), config.prompt, config.data.answers, store
    )
    model = Ref(path=str(tiny_model_64), digest="tiny64")
    adapter = train_adapter.fn(
        prompts, model, LoraSettings(r=4), TRAIN, "float32", store, quantization=quantization
    )
    trained = load_file(Path(adapter.path) / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in trained.items())
    merged = merge_adapter.fn(adapter, model, prompts, config.prompt, "float32", store, quantization)
    # A standard folder: plain weights (no quantisation config, no packed 4-bit or int8 tensors).
    folder = Path(merged.path)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values()) and not any(
        "absmax" in n or "SCB" in n for n in weights
    )
    check = json.loads((folder / "loraflow.json").read_text())["merge_check"]
    assert check["against"] == f"the {quantization}-quantised adapter model"
    # Its label scores match the quantised adapter model's (the model that trained) within the tolerance.
    tokenizer = load_tokenizer(folder)
    rows = read_prompts(prompts, "dev")[PROMPT].tolist()
    trained_on = PeftModel.from_pretrained(
        load_causal_lm(model.path, "float32", quantization), str(Path(adapter.path) / "adapter")
    ).eval()
    reference = score_labels(trained_on, tokenizer, rows, ["No", "Yes"])
    reloaded = score_labels(
        AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, rows, ["No", "Yes"]
    )
    difference = float(np.abs(reloaded - reference).max())
    print(f"{quantization}: merged vs quantised adapter model, max |Δ| label score {difference:.2e}")
    assert difference <= QUANTIZED_TOLERANCE and check["max_abs_diff"] <= QUANTIZED_TOLERANCE


@pytest.mark.parametrize("answers", [["Yes", "No way at all", "maybe"], ["Yes", "Yes please", "No"]])
@pytest.mark.parametrize("system", ["", "You judge places. Answer Yes or No, and nothing else, please."])
def test_label_scores_match_an_unbatched_reference(tiny_model: Path, system: str, answers: list[str]) -> None:
    """With a shared system message the common opening runs once (its cache reused): same scores."""
    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, "float32")
    opening = [{"role": "system", "content": system}] if system else []
    prompts = [[*opening, {"role": "user", "content": "x" * n + " Lima?"}] for n in (1, 7, 3, 20, 12)]
    batched = score_labels(model, tokenizer, prompts, answers, batch_size=2)
    for row, messages in enumerate(prompts):
        sequences, starts, ends = answer_spans(tokenizer, messages, answers)
        for label, (ids, start, end) in enumerate(zip(sequences, starts, ends, strict=True)):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            reference = sum(logprobs[t - 1, ids[t]].item() for t in range(start, end))
            assert batched[row, label] == pytest.approx(reference, abs=1e-4)


def test_the_turn_closing_is_scored_only_when_an_answer_starts_another(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(tiny_model)
    messages = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Lima?"}]

    def scored(answers: list[str]) -> list[str]:
        sequences, starts, ends = answer_spans(tokenizer, messages, answers)
        return [tokenizer.decode(s[a:b]) for s, a, b in zip(sequences, starts, ends, strict=True)]

    assert scored(["Yes", "No"]) == ["Yes", "No"]
    sequences, starts, ends = answer_spans(tokenizer, messages, ["Yes", "No"])
    assert [b - a for a, b in zip(starts, ends, strict=True)] == [1, 1]  # one forward pass decides
    assert scored(["Yes", "Yes please"]) == ["Yes<|im_end|>\n", "Yes please<|im_end|>\n"]


def test_merged_model_reloaded_from_disk_scores_like_the_adapter(prepared: tuple) -> None:
    prompts, model, prompt, store = prepared
    adapter = train_adapter.fn(prompts, model, LoraSettings(r=4), TRAIN, "float32", store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_adapter.fn(adapter, model, prompts, prompt, "float32", store)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # library noise, muted
    info = json.loads((Path(merged.path) / "loraflow.json").read_text())
    assert info["approach"] == "generative" and info["answers"] == ["No", "Yes"]
    tokenizer = load_tokenizer(merged.path)
    rows = read_prompts(prompts, "dev")[PROMPT].tolist()
    reloaded = AutoModelForCausalLM.from_pretrained(merged.path).eval()
    base = load_causal_lm(model.path, "float32")
    adapted = PeftModel.from_pretrained(base, str(Path(adapter.path) / "adapter")).eval()
    plain = score_labels(load_causal_lm(model.path, "float32"), tokenizer, rows, ["No", "Yes"])
    merged_scores = score_labels(reloaded, tokenizer, rows, ["No", "Yes"])
    adapter_scores = score_labels(adapted, tokenizer, rows, ["No", "Yes"])
    np.testing.assert_allclose(merged_scores, adapter_scores, atol=1e-4)
    assert np.abs(merged_scores - plain).max() > 1e-3  # and the merge did change the model


class _CrashAt(TrainerCallback):
    """Simulates a killed run: fails at the start of a given step, after the previous checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (transformers' signature)
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_interrupted_training_resumes_from_the_last_checkpoint(
    prepared: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts, model, _, store = prepared
    settings = TRAIN.model_copy(update={"select_best": False})  # checkpoints every save_steps, not per eval
    real = loraflow.tasks.generative.train.training_callbacks
    crashing = lambda train: [*real(train), _CrashAt(3)]  # noqa: E731
    monkeypatch.setattr(loraflow.tasks.generative.train, "training_callbacks", crashing)
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        train_adapter.fn(prompts, model, LoraSettings(r=4), settings, "float32", store)
    checkpoints = sorted(Path(store).glob("train-*.checkpoints/checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2"]
    assert not list(Path(store).glob("train-*[0-9a-f]/MANIFEST.json"))  # nothing looks finished

    monkeypatch.setattr(loraflow.tasks.generative.train, "training_callbacks", real)
    adapter = train_adapter.fn(prompts, model, LoraSettings(r=4), settings, "float32", store)
    stats = json.loads((Path(adapter.path) / "train.json").read_text())
    assert stats["resumed_from_step"] == 2 and stats["steps"] == 4
    history = json.loads((Path(adapter.path) / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == [2, 4]  # step 2 logged before the crash, 4 after
    assert not list(Path(store).glob("train-*.checkpoints"))


def test_training_metrics_reach_mlflow_when_a_tracking_uri_is_set(
    prepared: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # tracking_setup sets it for the callback
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_FakeTokenForTheMlflowTest0123")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prompts, model, _, _ = prepared
    frame = read_prompts(prompts, "train")
    dataset = Dataset.from_pandas(frame[[PROMPT, "completion"]], preserve_index=False)
    settings = TRAIN.model_copy(update={"tracking_uri": uri, "logging_steps": 1, "eval_steps": 2})
    trainer, _ = fit_adapter(
        dataset, model.path, LoraSettings(r=4), settings, "float32", tmp_path / "ckpt", DevRows.read(prompts)
    )
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("loraflow").experiment_id])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert [m.value for m in losses] == pytest.approx(logged, rel=1e-5)
    assert run.data.params["learning_rate"] == str(TRAIN.lr) and run.info.status == "FINISHED"
    f1 = client.get_metric_history(run.info.run_id, "eval_macro_f1")  # the dev curve, per evaluation
    assert [m.step for m in f1] == [2, 4]
    assert [m.value for m in f1] == pytest.approx(
        [e["eval_macro_f1"] for e in trainer.state.log_history if "eval_macro_f1" in e]
    )
    assert b"hf_FakeTokenForTheMlflowTest0123" not in (tmp_path / "mlflow.db").read_bytes()


def test_a_row_longer_than_max_length_loses_the_end_of_its_prompt_never_its_answer(
    prepared: tuple, tmp_path: Path, tiny_model: Path
) -> None:
    prompts, model, _, _ = prepared
    frame = read_prompts(prompts, "train").head(8).reset_index(drop=True)
    tokenizer = load_tokenizer(tiny_model)
    long = [dict(m) for m in frame.loc[0, PROMPT]]
    long[-1]["content"] += " Lima, Quito," * 200
    frame.at[0, PROMPT] = long
    fitted, cut = fit_prompts(tokenizer, frame, max_length=128)
    assert cut == 1
    shortened = fitted.loc[0, PROMPT][-1]["content"]
    assert shortened.endswith("…") and long[-1]["content"].startswith(shortened[:-1])
    lengths = [
        len(encode_choices(tokenizer, messages, [completion[0]["content"]])[0][0])
        for messages, completion in zip(fitted[PROMPT], fitted["completion"], strict=True)
    ]
    assert max(lengths) <= 128 and lengths[0] >= 120  # every row fits; the long one cut no more than needed
    assert fitted["completion"].tolist() == frame["completion"].tolist()
    assert [m["content"] for m in fitted.loc[1, PROMPT]] == [m["content"] for m in frame.loc[1, PROMPT]]
    dataset = Dataset.from_pandas(fitted[[PROMPT, "completion"]], preserve_index=False)
    trainer, _ = fit_adapter(dataset, model.path, LoraSettings(r=4), TRAIN, "float32", tmp_path / "ckpt")
    assert len(trainer.train_dataset) == len(frame)  # no row lost its answer, so TRL dropped none

    with pytest.raises(ConfigError, match="raise train.max_length or shorten prompt.system"):
        fit_prompts(tokenizer, frame, max_length=8)


def test_the_dev_answer_loss_is_minus_the_mean_log_prob_of_the_gold_answer(prepared: tuple) -> None:
    prompts, model, _, store = prepared
    result = evaluate_model.fn(model, prompts, "zero-shot", EvalSettings(batch_size=4), "float32", store)
    metrics, _ = read_evaluation(result)
    dev = read_prompts(prompts, "dev")
    labels, answers = read_answers(prompts)
    tokenizer, network = load_tokenizer(model.path), load_causal_lm(model.path, "float32")
    scores = score_labels(network, tokenizer, dev[PROMPT].tolist(), answers)
    gold = [labels.index(label) for label in dev["label"]]
    expected = -np.mean([scores[i, g] for i, g in enumerate(gold)])
    assert metrics["eval"]["answer_loss"] == pytest.approx(expected, rel=1e-5) and expected > 0


@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_setting_reaches_the_trainer_under_its_transformers_5_name(
    on: bool, tmp_path: Path
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = loraflow.tasks.generative.train.build_training_args(
            TrainSettings(gradient_checkpointing=on), tmp_path, bf16=False
        )
    assert args.activation_checkpointing is on and args.gradient_checkpointing is on
    assert not [w for w in caught if "checkpointing" in str(w.message)]


def test_the_lm_head_projects_only_the_answer_positions_on_a_cpu_with_the_same_loss(
    prepared: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL's fused LM head projects every position on a device without Triton; loraflow's trainer projects
    only the positions the loss reads (the answer's), which must not change the loss."""
    import trl.trainer.utils as fused

    prompts, model, _, _ = prepared
    frame = read_prompts(prompts, "train")
    dataset = Dataset.from_pandas(frame[[PROMPT, "completion"]], preserve_index=False)
    trainer, _ = fit_adapter(dataset, model.path, LoraSettings(r=4), TRAIN, "float32", tmp_path / "ckpt")
    rows_projected: list[int] = []
    projection = fused._ChunkedLogProbFunction

    class Counting(projection):  # type: ignore[misc, valid-type]
        @classmethod
        def apply(cls, hidden: torch.Tensor, *args: object) -> object:
            rows_projected.append(hidden.shape[0])
            return projection.apply(hidden, *args)

    monkeypatch.setattr(fused, "_ChunkedLogProbFunction", Counting)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    answer_positions = int((batch["labels"][:, 1:] != -100).sum())
    trainer.model.eval()
    with torch.no_grad():
        compact = float(trainer.compute_loss(trainer.model, dict(batch)))
        monkeypatch.setattr(fused, "_use_triton", fused._use_triton.__wrapped__)  # TRL's own choice
        every = float(trainer.compute_loss(trainer.model, dict(batch)))
    assert rows_projected == [answer_positions, batch["labels"][:, 1:].numel()]
    assert 0 < answer_positions < batch["labels"][:, 1:].numel() // 4  # the prompt is most of each row
    assert compact == pytest.approx(every, rel=1e-5)


def test_choice_loss_trains_on_the_answers_first_tokens_only(prepared: tuple, tmp_path: Path) -> None:
    """train.loss: choice is the cross-entropy among the labels' answers at the position that predicts the
    answer: equal to a direct computation from the model's full logits, and it moves the LoRA weights."""
    prompts, model, _, _ = prepared
    frame = read_prompts(prompts, "train")
    dataset = Dataset.from_pandas(frame[[PROMPT, "completion"]], preserve_index=False)
    labels, answers = read_answers(prompts)
    choice = TRAIN.model_copy(update={"loss": "choice"})
    trainer, _ = fit_adapter(
        dataset, model.path, LoraSettings(r=4), choice, "float32", tmp_path / "ckpt", answers=answers
    )
    assert trainer.state.global_step == 4
    assert any("lora_B" in n and p.detach().abs().sum() > 0 for n, p in trainer.model.named_parameters())
    assert "answer_accuracy" in trainer.state.log_history[0]

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    tokenizer = load_tokenizer(model.path)
    firsts = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(a))[0] for a in answers]
    trainer.model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, dict(batch)))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = []
    for row, row_labels in enumerate(batch["labels"]):
        first = int((row_labels != -100).nonzero()[0])
        scores = torch.log_softmax(logits[row, first - 1, firsts], dim=0)
        expected.append(-float(scores[firsts.index(int(batch["input_ids"][row, first]))]))
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)


def test_choice_loss_with_answers_that_begin_alike_is_a_config_error(prepared: tuple, tmp_path: Path) -> None:
    prompts, model, _, _ = prepared
    frame = read_prompts(prompts, "train")
    dataset = Dataset.from_pandas(frame[[PROMPT, "completion"]], preserve_index=False)
    choice = TRAIN.model_copy(update={"loss": "choice"})
    with pytest.raises(ConfigError, match=r"'Yes' and 'Yes, partly' both begin with .*train.loss: tokens"):
        fit_adapter(
            dataset,
            model.path,
            LoraSettings(r=4),
            choice,
            "float32",
            tmp_path / "ck",
            answers=["Yes", "Yes, partly"],
        )

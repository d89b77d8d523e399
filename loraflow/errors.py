"""Errors a user can fix: the CLI prints their message and exits non-zero, with no traceback; and the
did-you-mean hint their messages carry."""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A problem in the user's config, data or environment; the message says what and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """The config file is invalid; the message lists every problem with its field path."""


class DataError(UserError):
    """A data file cannot be read or breaks the data contract; the message names file, row and column."""


class ModelError(UserError):
    """The model cannot be resolved or loaded; the message says how to point at one that can."""


class ResourceError(UserError):
    """The machine ran out of something (GPU memory); the message says which settings to lower."""


class SweepError(UserError):
    """No trial of a sweep finished; the message says where each trial's error is."""


# Names users bring from Hugging Face TrainingArguments, peft and the seed notebooks.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "max_seq_length": "max_length",
    "warmup_steps": "warmup_ratio",
    "model_name": "name",
    "system_message": "system",
    "label": "label_column",
}


def did_you_mean(word: str, choices: list[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest choice (or the usual Hugging Face alias), or ""."""
    choices = [str(c) for c in choices if len(str(c)) <= 200]  # difflib is quadratic in the length
    if len(word) > 200:
        return ""
    if ALIASES.get(word) in choices:
        return f" (did you mean '{ALIASES[word]}'?)"
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)` for a message, cut to `limit` characters with the full length said: a cell of
    263 KB of NUL bytes must not become a 263 KB message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    cut = text[: limit - 1]
    escape = cut.rfind("\\")
    if escape >= len(cut) - 9:  # never half an escape such as \x00 or \U0001f600
        cut = cut[:escape]
    return f"{cut}…{size}"


def shown_error(error: BaseException, limit: int = 200) -> str:
    """An exception from a library, as one short line for a message."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = lines[0]
    return text if len(text) <= limit else f"{text[: limit - 1]}…"

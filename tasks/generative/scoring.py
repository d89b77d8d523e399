"""Label scoring: every label's answer scored as the continuation of a chat prompt (torch, a tokenizer and
a progress display only, no orchestration: the evaluate and predict tasks, the merge check and bench/gpu.py
use it).

For each row, the sum of the answer tokens' log-probs is computed for every label in one batched forward
pass per group of sequences; the prediction is the argmax and the probabilities the softmax over labels.
The answer turn's closing tokens (such as `<|im_end|>`) are scored only when one answer's tokens start
another's ("Yes" and "Yes, partly"): otherwise they tell the labels nothing, and single-token answers
("Yes"/"No") take a single forward pass.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from loraflow.console import ProgressDisplay


def _ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_choices(
    tokenizer: Any, messages: list[dict[str, str]], answers: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + each answer turn, as the trainer builds them, and where each answer starts."""
    prompt = _ids(tokenizer, messages, generation_prompt=True)
    sequences, starts = [], []
    for answer in answers:
        full = _ids(tokenizer, [*messages, {"role": "assistant", "content": answer}], generation_prompt=False)
        sequences.append(full)
        starts.append(_common_prefix(prompt, full))
    return sequences, starts


def answer_spans(
    tokenizer: Any, messages: list[dict[str, str]], answers: list[str]
) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences, starts, ends): the tokens of prompt + each answer turn and the span [start, end) to score.

    The span is the answer's own tokens when no answer's tokens start another's; otherwise it runs to the end
    of the turn, so that "Yes" is scored as a whole answer and not as the opening of "Yes, partly".
    """
    sequences, starts = encode_choices(tokenizer, messages, answers)
    closing = _turn_closing(tokenizer, tuple(m["role"] for m in messages))
    ends = []
    for ids, start in zip(sequences, starts, strict=True):
        end = len(ids) - len(closing)
        closed = bool(closing) and end > start and ids[end:] == closing
        ends.append(end if closed else len(ids))
    contents = [tuple(ids[a:b]) for ids, a, b in zip(sequences, starts, ends, strict=True)]
    prefix_free = all(
        a[: len(b)] != b for i, a in enumerate(contents) for j, b in enumerate(contents) if i != j
    )
    return sequences, starts, ends if prefix_free else [len(ids) for ids in sequences]


def _turn_closing(tokenizer: Any, roles: tuple[str, ...]) -> list[int]:
    """Token ids the chat template puts after an assistant answer (e.g. `<|im_end|>` and a newline)."""
    sentinel = "\u2063loraflow-answer\u2063"
    probe = [{"role": r, "content": "x"} for r in roles] + [{"role": "assistant", "content": sentinel}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text.split(sentinel)[-1] if sentinel in text else ""
    return tokenizer(after, add_special_tokens=False)["input_ids"] if after else []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _left_pad(
    sequences: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


@torch.no_grad()
def score_labels(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    answers: list[str],
    batch_size: int = 16,
    progress: str | None = None,
) -> np.ndarray:
    """(rows × labels) sums of the answer tokens' log-probs given each prompt; `progress` is the progress
    display's description (None: none shown).

    The opening all prompts share (system message, the template's fixed text) is run once and its KV cache
    reused; the rest of each prompt is run once per row; its KV cache is repeated for the labels, and only
    the answer tokens are run per label. When every answer is a single token, the prompt's forward pass is
    all it takes. Which tokens are scored: `answer_spans`.
    """
    rows = []  # (shared prefix, continuation per label, answer tokens to score per label)
    for messages in prompts:
        sequences, starts, ends = answer_spans(tokenizer, messages, answers)
        cut = min(starts)
        rows.append(
            (
                sequences[0][:cut],
                [s[cut:e] for s, e in zip(sequences, ends, strict=True)],
                [e - a for a, e in zip(starts, ends, strict=True)],
            )
        )
    k = len(answers)
    scores = np.zeros((len(rows), k), dtype=np.float64)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    # The system message and the template's fixed text open every prompt: run them once, reuse their cache.
    shared = _shared_prefix([r[0] for r in rows]) if len(rows) > 1 else []
    if len(shared) < MIN_SHARED_PREFIX:
        shared = []
    prefix_cache = None
    if shared:
        prefix_cache = model(input_ids=torch.tensor([shared], device=device), use_cache=True).cache
    cut = len(shared)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
    with ProgressDisplay(progress, len(order), "rows") as shown:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            ids, own = _left_pad([rows[i][0][cut:] for i in index], pad, device)
            mask = torch.cat([torch.ones(len(index), cut, dtype=own.dtype, device=device), own], dim=1)
            positions = cut + (own.cumsum(-1) - 1).clamp(min=0)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(index))
            prompt_out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            continuations = [rows[i][1][j] for i in index for j in range(k)]
            width = max(len(c) for c in continuations)
            first = (
                prompt_out.logits[:, -1:].float().repeat_interleave(k, dim=0)
            )  # predicts each answer's 1st token
            targets = torch.tensor([c + [pad] * (width - len(c)) for c in continuations], device=device)
            if width == 1:
                logits = first
            else:
                cache = prompt_out.cache
                cache.batch_repeat_interleave(k)
                extra_mask = torch.tensor(
                    [[1] * len(c) + [0] * (width - len(c)) for c in continuations], device=device
                )
                lengths = mask.sum(-1).repeat_interleave(k)[:, None]
                answer_out = model(
                    input_ids=targets,
                    attention_mask=torch.cat([mask.repeat_interleave(k, dim=0), extra_mask], dim=1),
                    position_ids=lengths + torch.arange(width, device=device)[None, :],
                    cache=cache,
                )
                logits = torch.cat([first, answer_out.logits[:, :-1].float()], dim=1)
            logprobs = (
                torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1).cpu().numpy()
            )
            for position, (i, j) in enumerate((i, j) for i in index for j in range(k)):
                length, scored = len(rows[i][1][j]), rows[i][2][j]
                scores[i, j] = logprobs[position, length - scored : length].sum()
            shown.update(start + len(index))
    if not np.isfinite(scores).all():
        raise RuntimeError("label scores are not finite (NaN/inf): the model's weights or dtype are broken")
    return scores


MIN_SHARED_PREFIX = 8  # tokens; a shorter common opening is not worth a separate pass


def _shared_prefix(prompts: list[list[int]]) -> list[int]:
    """The token ids every prompt starts with, leaving at least one token of each prompt to run per row."""
    if not prompts:
        return []
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for prompt in prompts[1:]:
        n = min(n, _common_prefix(first[:n], prompt))
    return first[: max(n, 0)]

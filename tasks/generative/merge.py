"""Merge of the generative approach: the adapter folded into the causal LM, checked by label scoring."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from loraflow.config import PromptSettings, template_fields
from loraflow.tasks.generative.prepare import PROMPT, read_answers, read_prompts
from loraflow.tasks.generative.scoring import score_labels
from loraflow.tasks.manifest import CardUsage, ModelManifest
from loraflow.tasks.merging import CHECK_ROWS, checked_against, load_adapter, merge_checked, save_merged
from loraflow.tasks.models import dequantized, load_causal_lm, load_tokenizer, trusts_code
from loraflow.tasks.store import CONTENT_CACHE, Ref, digest_of, is_complete, named_for_config, step_output

CARD = CardUsage(
    pipeline_tag="text-generation",
    usage=(
        "```bash\nloraflow predict --model PATH --input new.xlsx --output labelled.xlsx\n```\n\n"
        "The model answers each row's prompt with one of the label answers below; `loraflow predict` "
        "scores every answer and returns the most likely label with per-label probabilities. It also "
        "loads as a standard causal LM (`AutoModelForCausalLM.from_pretrained(PATH)`)."
    ),
)


@task(name="merge-adapter", task_run_name=named_for_config("merge-adapter"), cache_policy=CONTENT_CACHE)
def merge_adapter(
    adapter: Ref,
    model: Ref,
    prompts: Ref,
    prompt: PromptSettings,
    dtype: str,
    store: str,
    quantization: str = "none",
) -> Ref:
    """Write `merged/` (safetensors + tokenizer + loraflow.json) after checking it scores like the adapter.
    An adapter trained on a quantised base (`quantization`) is merged into that base's de-quantised weights:
    the merged model is a standard one that scores like the quantised adapter model."""
    key = digest_of("merge", adapter.digest, model.digest, prompts.digest, prompt, dtype, quantization)
    folder, result = step_output(store, "merge", key, "merged")
    if is_complete(folder):
        return result
    labels, answers = read_answers(prompts)
    rows = read_prompts(prompts, "dev")[PROMPT].tolist()[:CHECK_ROWS]
    tokenizer = load_tokenizer(model.path)
    scores = lambda m: score_labels(m, tokenizer, rows, answers)  # noqa: E731
    trained_on = None  # the scores of the quantised model the adapter was trained on
    if quantization != "none":
        quantized = load_causal_lm(model.path, "float32", quantization)
        trained_on = scores(load_adapter(quantized, Path(adapter.path) / "adapter"))
        del quantized
    base = dequantized(load_causal_lm(model.path, "float32", quantization))  # merge in full precision
    adapted = load_adapter(base, Path(adapter.path) / "adapter")
    merged, difference = merge_checked(adapted, scores, trained_on)
    manifest = ModelManifest(
        approach="generative",
        labels=labels,
        answers=answers,
        prompt=prompt,
        columns=template_fields(prompt.template),
        trust_remote_code=trusts_code(model.path),
        merge_check={"rows": len(rows), "max_abs_diff": difference, "against": checked_against(quantization)},
        card=CARD,
    )
    save_merged(folder, merged, tokenizer, dtype, manifest)
    return result

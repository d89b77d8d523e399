"""Merge of the classifier approach: LoRA folded in, the trained head kept, label names in config.json so
that `pipeline("text-classification", model=merged)` answers with them; checked on the head's logits.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from loraflow.tasks.classifier.prepare import read_label_map
from loraflow.tasks.classifier.scoring import classifier_tokenizer, load_classifier, predict_logits
from loraflow.tasks.ingest import read_split
from loraflow.tasks.manifest import CardUsage, ModelManifest
from loraflow.tasks.merging import CHECK_ROWS, checked_against, load_adapter, merge_checked, save_merged
from loraflow.tasks.models import dequantized, trusts_code
from loraflow.tasks.store import (
    CONTENT_CACHE,
    Ref,
    digest_of,
    is_complete,
    named_for_config,
    step_output,
)


def card_usage(sentence_pair: bool) -> CardUsage:
    """The model card's pipeline tag and usage snippet: transformers' text-classification pipeline."""
    call = (
        'classify({"text": "first sentence", "text_pair": "second sentence"})\n'
        if sentence_pair
        else 'classify("the text to label")\n'
    )
    usage = (
        "```python\nfrom transformers import pipeline\n\n"
        'classify = pipeline("text-classification", model="PATH_OR_REPO")\n' + call + "```"
    )
    return CardUsage(pipeline_tag="text-classification", usage=usage)


@task(name="merge-classifier", task_run_name=named_for_config("merge-classifier"), cache_policy=CONTENT_CACHE)
def merge_adapter(
    adapter: Ref,
    model: Ref,
    encoded: Ref,
    max_length: int,
    dtype: str,
    store: str,
    quantization: str = "none",
) -> Ref:
    """Write `merged/` (base + LoRA folded in + the trained head, label names in config.json) after
    checking that it gives the adapter model's logits. An adapter trained on a quantised base
    (`quantization`) is merged into that base's de-quantised weights: a standard model with the logits of
    the quantised adapter model."""
    key = digest_of(
        "merge-cls", adapter.digest, model.digest, encoded.digest, max_length, dtype, quantization
    )
    folder, result = step_output(store, "merge-cls", key, "merged")
    if is_complete(folder):
        return result
    label_map = read_label_map(encoded)
    rows = read_split(encoded, "dev").head(CHECK_ROWS)
    tokenizer = classifier_tokenizer(model.path)
    labels, folder_of_adapter = label_map["labels"], Path(adapter.path) / "adapter"
    logits = lambda m: predict_logits(m, tokenizer, rows, max_length)  # noqa: E731
    trained_on = None  # the logits of the quantised model the adapter was trained on
    if quantization != "none":
        quantized = load_classifier(model.path, labels, tokenizer, "float32", quantization)
        trained_on = logits(load_adapter(quantized, folder_of_adapter))
        del quantized
    base = dequantized(load_classifier(model.path, labels, tokenizer, "float32", quantization))
    adapted = load_adapter(base, folder_of_adapter)
    merged, difference = merge_checked(adapted, logits, trained_on)
    manifest = ModelManifest(
        approach="classifier",
        labels=label_map["labels"],
        label2id=label_map["label2id"],
        columns=label_map["columns"],
        template=label_map["template"],
        max_length=max_length,
        trust_remote_code=trusts_code(model.path),
        merge_check={"rows": len(rows), "max_abs_diff": difference, "against": checked_against(quantization)},
        card=card_usage(sentence_pair=len(label_map["columns"]) == 2 and not label_map["template"]),
    )
    save_merged(folder, merged, tokenizer, dtype, manifest)
    return result

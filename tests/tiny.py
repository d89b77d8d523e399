"""Tiny random models and tokenizers built from configs (no downloads), and small labelled tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Is the condition met? Requirement: on the seashore. Sample data: Lima, Zurich, Cairo. Yes No",
    "system user assistant Requirement Sample data mountains desert capital river Europe 0 1",
]


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, emoji included) with a ChatML chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    wrapped.chat_template = CHATML
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A 2-layer Llama with hidden size `hidden` (32; 64 for bitsandbytes, which quantises in blocks of 64)
    and its tokenizer, saved as a standard HF folder."""
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def geo_rows(n: int, seed: int = 0) -> pd.DataFrame:
    """n balanced rows in the geo example's shape (requirement, sample_data, score)."""
    places = ["Lima", "Zurich", "Cairo", "Oslo", "Denver", "Perth", "Quito", "Doha"]
    requirements = ["on the seashore", "in the mountains", "in a desert"]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        picks = torch.randperm(len(places), generator=generator)[: 2 + i % 3].tolist()
        rows.append(
            {
                "requirement": requirements[i % len(requirements)],
                "sample_data": ", ".join(places[j] for j in picks),
                "score": i % 2,
            }
        )
    return pd.DataFrame(rows)


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (hidden size 32) with a WordPiece tokenizer, saved as a standard HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(
        {w for line in CORPUS for w in line.lower().replace(".", " . ").replace(",", " , ").split()}
    )
    letters = sorted({c for line in CORPUS for c in line.lower() if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"##{c}" for c in letters)]
    vocab += [c for c in letters if c not in vocab]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder

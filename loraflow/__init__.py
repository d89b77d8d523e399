"""loraflow: a spreadsheet of labelled examples in, a fine-tuned, merged and evaluated LLM out."""

__version__ = "0.1.0"

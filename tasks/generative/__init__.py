"""The generative approach: the model's own LM head learns to answer each row's label.

prepare (prompts), scoring (label scoring), train, merge, evaluate (+ zero-shot), predict.
"""

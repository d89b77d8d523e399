"""The classifier approach: a new classification head on a label map inferred from the data.

prepare (label map), scoring (the head's logits), train, merge, evaluate (+ majority class), predict.
"""

"""The embedded examples (package data): geo (generative), pairs (classifier); config.yaml + data each."""

"""Experiment configs: the base config every experiment starts from (`base`), the toy world's
pipeline stages (`toy`) and the real models' (`real`)."""

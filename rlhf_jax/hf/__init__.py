"""Hugging Face interop: config translation (`config`) and checkpoint import / export
(`checkpoints`)."""

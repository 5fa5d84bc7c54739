"""Metrics papers report: bits per character (enwik8), word-level perplexity (PG-19)."""
from longlm.evaluation.lm import evaluate_stream, lm_metrics, load_model_folder

__all__ = ["evaluate_stream", "lm_metrics", "load_model_folder"]

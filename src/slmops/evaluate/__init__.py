"""Evaluation: task metrics over answers generated through an Engine."""

from slmops.evaluate.metrics import exact_match, field_accuracy, json_valid, score_answers
from slmops.evaluate.runner import EvalResult, compare_latency, evaluate_engine, measure_latency

__all__ = ["EvalResult", "compare_latency", "evaluate_engine", "exact_match", "field_accuracy", "json_valid", "measure_latency",
           "score_answers"]

"""Evaluation: task metrics over answers generated through an Engine, bootstrap intervals, quality gates.

`slmops eval` is :func:`slmops.evaluate.suite.run_evaluation`; gates are in :mod:`slmops.evaluate.gates`.
"""

from slmops.evaluate.gates import Gate, GateResult, check_gates, load_gates_file, parse_gate, parse_max_drop
from slmops.evaluate.metrics import exact_match, field_accuracy, json_valid, score_answers
from slmops.evaluate.runner import EvalResult, compare_latency, evaluate_engine, measure_latency

__all__ = ["EvalResult", "Gate", "GateResult", "check_gates", "compare_latency", "evaluate_engine", "exact_match",
           "field_accuracy", "json_valid", "load_gates_file", "measure_latency", "parse_gate", "parse_max_drop",
           "score_answers"]

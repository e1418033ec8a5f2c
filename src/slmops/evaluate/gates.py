"""Quality gates on evaluation scores: what CI and the registry use to decide promotion.

Three ways to state a gate, all becoming :class:`Gate` objects:

- an expression: ``parse_gate("exact_match>=0.9")`` (operators ``>=``, ``>``, ``<=``, ``<``, ``==``);
- a largest allowed drop against a baseline model: ``parse_max_drop("exact_match=0.02")`` (the candidate
  may score at most 0.02 below the baseline, absolute);
- a YAML file (:func:`load_gates_file`)::

      gates:
        - {metric: exact_match, min: 0.9}
        - {metric: perplexity, max: 12}
        - {expr: "json_valid>=0.99"}
      max_drop: {exact_match: 0.02}
      baseline: models/teacher        # optional: the model max_drop compares with

``check_gates(scores, gates, baseline_scores)`` evaluates them; :func:`raise_if_failed` raises
:class:`slmops.errors.GateFailedError` (exit code 3) with one line per failed gate, e.g.
``gate failed: exact_match 0.850 < 0.900 (short by 0.050) for model X``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slmops.config import StrictModel, load_yaml_config
from slmops.errors import BadInputError, GateFailedError

Op = Literal[">=", ">", "<=", "<", "=="]
OPS: dict[str, Any] = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
                       "==": lambda a, b: math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)}
_NEGATION = {">=": "<", ">": "<=", "<=": ">", "<": ">=", "==": "!="}
_GATE_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*$")
_DROP_RE = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(%?)\s*$")


@dataclass(frozen=True)
class Gate:
    """`metric` `op` `threshold`; with ``kind="max_drop"`` the threshold is the largest allowed drop below the
    baseline's score (the effective gate is ``metric >= baseline - threshold``)."""

    metric: str
    op: Op
    threshold: float
    kind: Literal["absolute", "max_drop"] = "absolute"
    expr: str = ""

    def __post_init__(self) -> None:
        if not self.expr:
            text = (f"{self.metric}{self.op}{self.threshold:g}" if self.kind == "absolute"
                    else f"max_drop {self.metric}={self.threshold:g}")
            object.__setattr__(self, "expr", text)


@dataclass
class GateResult:
    gate: Gate
    value: float | None  # the model's score (None: not measured)
    threshold: float  # the effective threshold (for max_drop: baseline - drop)
    passed: bool
    reason: str  # one line; for a failure "gate failed: ..."
    model: str | None = None
    baseline: float | None = None

    @property
    def metric(self) -> str:
        return self.gate.metric

    @property
    def expr(self) -> str:
        return self.gate.expr

    def to_dict(self) -> dict[str, Any]:
        """The manifest / eval.json form: expr, metric, value, threshold, passed, reason."""
        return {"expr": self.expr, "metric": self.metric, "value": self.value, "threshold": self.threshold,
                "passed": self.passed, "reason": self.reason}


def _number(text: str, pct: str) -> float:
    value = float(text)
    return value / 100 if pct else value


def parse_gate(expr: str) -> Gate:
    """``"exact_match>=0.9"`` -> Gate (a trailing % divides by 100: ``"json_valid>=99%"``)."""
    m = _GATE_RE.match(expr or "")
    if not m:
        raise BadInputError(f"bad gate {expr!r}: expected METRIC OP NUMBER, e.g. \"exact_match>=0.9\"",
                            "operators: >=, >, <=, <, ==; quote the gate in the shell")
    metric, op, num, pct = m.groups()
    return Gate(metric=metric, op=op, threshold=_number(num, pct), expr=expr.strip())  # type: ignore[arg-type]


def parse_max_drop(expr: str) -> Gate:
    """``"exact_match=0.02"`` -> a max-drop Gate: at most 0.02 (absolute) below the baseline."""
    m = _DROP_RE.match(expr or "")
    if not m:
        raise BadInputError(f"bad --max-drop {expr!r}: expected METRIC=DROP, e.g. exact_match=0.02")
    metric, num, pct = m.groups()
    drop = _number(num, pct)
    if drop < 0:
        raise BadInputError(f"bad --max-drop {expr!r}: the drop must be >= 0")
    return max_drop_gate(metric, drop)


def max_drop_gate(metric: str, drop: float) -> Gate:
    return Gate(metric=metric, op=">=", threshold=float(drop), kind="max_drop",
                expr=f"max_drop {metric}={float(drop):g}")


def lower_is_better(metric: str) -> bool:
    """Metrics where a *rise* is the regression (a max-drop gate on them limits the rise)."""
    return metric in ("perplexity", "mean_kl")


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def check_gates(scores: Mapping[str, Any], gates: list[Gate], baseline_scores: Mapping[str, Any] | None = None,
                *, model: str | None = None) -> list[GateResult]:
    """Evaluate `gates` on `scores` (metric -> number, or an object with ``.value``, or a dict with "value").

    A gated metric missing from `scores` is a BadInputError (it was not asked for); one that is present but
    None (not measurable for this model, e.g. perplexity through a remote server) fails its gate. A max-drop
    gate needs `baseline_scores`; for perplexity and mean_kl it limits the rise instead of the drop.
    """
    results = []
    for gate in gates:
        value = _value(scores, gate.metric, "model")
        who = f" for model {model}" if model else ""
        if gate.kind == "max_drop":
            if baseline_scores is None:
                raise BadInputError(f"gate {gate.expr!r} needs a baseline model", "pass --baseline MODEL")
            base = _value(baseline_scores, gate.metric, "baseline")
            if base is None:
                raise BadInputError(f"gate {gate.expr!r}: the baseline has no {gate.metric} score")
            rising = lower_is_better(gate.metric)
            threshold = base + gate.threshold if rising else base - gate.threshold
            op: str = "<=" if rising else ">="
            limit = f"baseline {_fmt(base)} {'+' if rising else '-'} max drop {_fmt(gate.threshold)}"
        else:
            base, threshold, op, limit = None, gate.threshold, gate.op, ""
        if value is None:
            results.append(GateResult(gate, None, threshold, False,
                                      f"gate failed: {gate.metric} was not measured (needed: {op} {_fmt(threshold)}){who}",
                                      model, base))
            continue
        passed = bool(OPS[op](value, threshold))
        miss = abs(value - threshold)
        how = "short by" if op in (">=", ">") else "over by" if op in ("<=", "<") else "off by"
        detail = f"{how} {_fmt(miss)}" if not passed else ""
        if limit:
            detail = f"{limit}; {detail}" if detail else limit
        shown_op = _NEGATION[op] if not passed else op
        text = f"{gate.metric} {_fmt(value)} {shown_op} {_fmt(threshold)}" + (f" ({detail})" if detail else "")
        results.append(GateResult(gate, float(value), float(threshold), passed,
                                  ("gate passed: " if passed else "gate failed: ") + text + who, model, base))
    return results


def _value(scores: Mapping[str, Any], metric: str, whose: str) -> float | None:
    if metric not in scores:
        known = ", ".join(sorted(scores)) or "none"
        raise BadInputError(f"gate on {metric!r}, but the {whose} has no such score (scores: {known})",
                            "gate on a measured metric, or add it to --metrics")
    v = scores[metric]
    if isinstance(v, Mapping):
        v = v.get("value")
    elif hasattr(v, "value"):
        v = v.value
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def failure_lines(results: list[GateResult]) -> list[str]:
    return [r.reason for r in results if not r.passed]


def raise_if_failed(results: list[GateResult]) -> None:
    """GateFailedError (exit code 3) whose message is one line per failed gate."""
    lines = failure_lines(results)
    if lines:
        err = GateFailedError("\n".join(lines))
        err.results = results  # type: ignore[attr-defined]
        raise err


# --- YAML --------------------------------------------------------------------------------------------


class GateSpec(StrictModel):
    """One entry of `gates:`: ``{metric, min}`` (>=), ``{metric, max}`` (<=), both, or ``{expr}``."""

    metric: str | None = None
    min: float | None = None
    max: float | None = None
    expr: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> GateSpec:
        if self.expr is not None:
            if self.metric is not None or self.min is not None or self.max is not None:
                raise ValueError("give either expr, or metric with min and/or max, not both")
            parse_gate(self.expr)
        elif self.metric is None or (self.min is None and self.max is None):
            raise ValueError("a gate needs metric and min and/or max (or expr: \"metric>=value\")")
        return self

    def to_gates(self) -> list[Gate]:
        if self.expr is not None:
            return [parse_gate(self.expr)]
        out = []
        assert self.metric is not None
        if self.min is not None:
            out.append(Gate(self.metric, ">=", self.min))
        if self.max is not None:
            out.append(Gate(self.metric, "<=", self.max))
        return out


class GatesFile(StrictModel):
    """A gates YAML file: absolute `gates`, `max_drop` per metric against `baseline` (a model reference)."""

    gates: list[GateSpec] = Field(default_factory=list)
    max_drop: dict[str, float] = Field(default_factory=dict)
    baseline: str | None = None

    @model_validator(mode="after")
    def _drops(self) -> GatesFile:
        bad = [k for k, v in self.max_drop.items() if v < 0]
        if bad:
            raise ValueError(f"max_drop must be >= 0 (for {', '.join(bad)})")
        return self

    def to_gates(self) -> list[Gate]:
        out = [g for spec in self.gates for g in spec.to_gates()]
        return out + [max_drop_gate(m, d) for m, d in self.max_drop.items()]


def load_gates_file(path: str | Path) -> GatesFile:
    """Read a gates YAML file; unknown keys and bad values are errors naming file:line."""
    return load_yaml_config(path, GatesFile)


__all__ = ["Gate", "GateResult", "GateSpec", "GatesFile", "check_gates", "failure_lines", "load_gates_file",
           "max_drop_gate", "parse_gate", "parse_max_drop", "raise_if_failed"]

"""Quality gates: parsing, evaluation, messages, YAML files."""

from __future__ import annotations

import pytest

from slmops.errors import BadInputError, GateFailedError
from slmops.evaluate.bootstrap import Score
from slmops.evaluate.gates import (
    Gate,
    check_gates,
    load_gates_file,
    parse_gate,
    parse_max_drop,
    raise_if_failed,
)


def test_parse_gate_operators_and_errors():
    assert parse_gate("exact_match>=0.9") == Gate("exact_match", ">=", 0.9, expr="exact_match>=0.9")
    for op in (">=", ">", "<=", "<", "=="):
        g = parse_gate(f" perplexity {op} 12 ")
        assert g.op == op and g.threshold == 12.0 and g.metric == "perplexity"
    assert parse_gate("json_valid>=99%").threshold == pytest.approx(0.99)
    assert parse_gate("field.intent>.5").metric == "field.intent"
    for bad in ("exact_match", "exact_match=>0.9", ">=0.9", "exact_match>=abc", "exact_match != 1"):
        with pytest.raises(BadInputError):
            parse_gate(bad)
    drop = parse_max_drop("exact_match=0.02")
    assert drop.kind == "max_drop" and drop.threshold == 0.02
    with pytest.raises(BadInputError):
        parse_max_drop("exact_match>=0.02")


def test_check_gates_values_and_one_line_reasons():
    scores = {"exact_match": 0.85, "json_valid": Score(1.0, 0.9, 1.0, 10), "perplexity": {"value": 3.0}}
    res = check_gates(scores, [parse_gate("exact_match>=0.9"), parse_gate("json_valid>=0.99"),
                               parse_gate("perplexity<2.5")], model="X")
    assert [r.passed for r in res] == [False, True, False]
    assert res[0].reason == "gate failed: exact_match 0.850 < 0.900 (short by 0.050) for model X"
    assert res[2].reason == "gate failed: perplexity 3.000 >= 2.500 (over by 0.500) for model X"
    assert res[1].reason.startswith("gate passed: json_valid 1.000 >= 0.990")
    d = res[0].to_dict()
    assert set(d) == {"expr", "metric", "value", "threshold", "passed", "reason"} and d["threshold"] == 0.9
    with pytest.raises(GateFailedError) as exc:
        raise_if_failed(res)
    assert exc.value.exit_code == 3 and len(str(exc.value).splitlines()) == 2
    raise_if_failed(res[1:2])  # all passed: no error


def test_max_drop_against_a_baseline():
    gates = [parse_max_drop("exact_match=0.02"), parse_max_drop("perplexity=0.5")]
    res = check_gates({"exact_match": 0.87, "perplexity": 3.2}, gates, {"exact_match": 0.9, "perplexity": 3.0})
    assert not res[0].passed and res[0].threshold == pytest.approx(0.88)
    assert "short by 0.010" in res[0].reason and "baseline 0.900" in res[0].reason
    assert res[1].passed  # perplexity may rise by at most 0.5
    assert check_gates({"exact_match": 0.89}, gates[:1], {"exact_match": 0.9})[0].passed
    with pytest.raises(BadInputError, match="baseline"):
        check_gates({"exact_match": 0.9}, gates[:1])


def test_unmeasured_and_unknown_metrics():
    res = check_gates({"perplexity": None}, [parse_gate("perplexity<=10")])
    assert not res[0].passed and "not measured" in res[0].reason
    with pytest.raises(BadInputError, match="no such score"):
        check_gates({"exact_match": 1.0}, [parse_gate("bleu>=10")])


def test_gates_yaml(tmp_path):
    f = tmp_path / "gates.yaml"
    f.write_text("gates:\n  - {metric: exact_match, min: 0.9}\n  - metric: perplexity\n    max: 12\n"
                 "  - expr: \"json_valid>=0.99\"\nmax_drop: {exact_match: 0.02}\nbaseline: teacher\n")
    spec = load_gates_file(f)
    gates = spec.to_gates()
    assert [g.expr for g in gates] == ["exact_match>=0.9", "perplexity<=12", "json_valid>=0.99",
                                       "max_drop exact_match=0.02"]
    assert spec.baseline == "teacher"
    f.write_text("gates:\n  - metric: exact_match\n    minimum: 0.9\n")
    with pytest.raises(BadInputError) as exc:
        load_gates_file(f)
    assert f"{f}:3" in str(exc.value) and "unknown key" in str(exc.value)
    f.write_text("gates:\n  - metric: exact_match\n")
    with pytest.raises(BadInputError, match="min and/or max"):
        load_gates_file(f)
    f.write_text("treshold: 1\n")
    with pytest.raises(BadInputError, match=f"{f}:1"):
        load_gates_file(f)

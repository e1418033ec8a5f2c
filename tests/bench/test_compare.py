"""Results from different machines are never compared as if they were one."""

from __future__ import annotations

import copy

import pytest

from slmops.bench.results import machine_fingerprint
from slmops.bench.run import compare_results, machine_differences
from slmops.errors import BadInputError


def _payload(machine, decode=100.0):
    return {"machine": machine, "rows": [{"name": "m", "decode_tok_s": decode, "ttft_s": 0.01}],
            "generated": "2026-01-01T00:00:00"}


def test_same_machine_compares():
    m = machine_fingerprint()
    out = compare_results(_payload(m, 100.0), _payload(copy.deepcopy(m), 150.0))
    assert out["ratios_new_over_old"]["m"]["decode_tok_s"] == pytest.approx(1.5)
    assert out["hardware_differences"] == [] and out["library_differences"] == []


def test_different_cpu_is_refused():
    m = machine_fingerprint()
    other = dict(copy.deepcopy(m), cpu="Some Other CPU @ 9.9GHz", cores=64)
    with pytest.raises(BadInputError) as exc:
        compare_results(_payload(other), _payload(m))
    assert "different machines" in str(exc.value) and "cpu" in str(exc.value) and "cores" in str(exc.value)
    assert exc.value.exit_code == 2


def test_force_compares_but_warns_loudly():
    m = machine_fingerprint()
    other = dict(copy.deepcopy(m), memory_gib=(m["memory_gib"] or 0) + 64)
    warnings = []
    out = compare_results(_payload(other, 50.0), _payload(m, 100.0), force=True, warn=warnings.append)
    assert out["ratios_new_over_old"]["m"]["decode_tok_s"] == pytest.approx(2.0)
    assert any("DIFFERENT MACHINES" in w for w in warnings)


def test_library_versions_only_warn():
    m = machine_fingerprint()
    old = copy.deepcopy(m)
    old["libraries"] = dict(old["libraries"], torch="1.0.0")
    hw, libs = machine_differences(old, m)
    assert hw == [] and any(line.startswith("torch: 1.0.0") for line in libs)
    warnings = []
    compare_results(_payload(old), _payload(m), warn=warnings.append)
    assert any("library versions differ" in w for w in warnings)


def test_results_without_fingerprint_are_refused():
    with pytest.raises(BadInputError):
        compare_results({"rows": []}, _payload(machine_fingerprint()))

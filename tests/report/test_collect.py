"""Collecting variants, lineage, metrics, gates and bench numbers from a workspace and from result files."""

from __future__ import annotations

import json

import pytest

from slmops.errors import BadInputError
from slmops.report import collect
from slmops.report.collect import latency_axis, quality_axis
from slmops.report.plots import layered_layout
from slmops.workspace import Workspace


def test_workspace_variants_lineage_and_metrics(lifecycle_ws):
    ws, ids = lifecycle_ws
    data = collect(ws)
    assert {n.id for n in data.nodes} == set(ids.values())
    keys = [v.key for v in data.variants]   # by generation, then creation time
    assert keys[:3] == [ids[k] for k in ("teacher", "student", "adapter")]
    assert set(keys[3:]) == {ids["onnx"], ids["gguf"]}
    teacher = data.variant("demo-teacher")
    assert teacher.key == ids["teacher"] and teacher.parameters == 3_164_416
    em = teacher.quality["test"]["exact_match"]
    assert (em.value, em.low, em.high, em.n) == (1.0, 0.99, 1.0, 300)
    assert teacher.quality["test"]["token_f1"].low == pytest.approx(0.978)
    assert teacher.templates["test"].startswith("chatml")
    assert teacher.bench["decode_tok_s"].value == 322.9 and teacher.bytes_on_disk == 12_000_000
    assert teacher.gates_passed is True and teacher.gates[0].expr == "exact_match>=0.9"
    gguf = data.variant(ids["gguf"])
    assert gguf.gates_passed is False
    assert [g.passed for g in gguf.gates] == [False, True] and "short by 0.0235" in gguf.gates[0].reason
    assert gguf.parity["mean_kl"] == 0.0063 and gguf.precision == "q4_k_m" and gguf.format == "gguf"
    assert data.variant(ids["onnx"]).parity["ppl_ratio"] == 0.9880
    adapter = data.variant(ids["adapter"])
    assert adapter.bench == {} and adapter.gates == []
    assert adapter.quality["recorded"]["exact_match_new_task"].value == 0.945
    assert adapter.size_note == "base + adapter files" and adapter.bytes_on_disk > 2_000_000
    assert quality_axis(data.variants) == ("test", "exact_match")
    assert latency_axis(data.variants) == "latency_s"
    assert quality_axis(data.variants, "no_such_metric") is None


def test_chosen_artifacts_bring_ancestors_as_context(lifecycle_ws):
    ws, ids = lifecycle_ws
    data = collect(ws, artifacts=[ids["onnx"]])
    assert [v.key for v in data.variants] == [ids["onnx"]]
    selected = {n.id: n.selected for n in data.nodes}
    assert selected[ids["onnx"]] is True
    assert {i for i, s in selected.items() if not s} == {ids["student"], ids["adapter"], ids["teacher"], ids["synthetic"]}
    with pytest.raises(BadInputError):
        collect(ws, artifacts=["no-such-artifact"])


def test_result_files_merge_with_workspace_and_add_remote_variants(lifecycle_ws, result_files):
    ws, ids = lifecycle_ws
    ev, bench = result_files
    data = collect(ws, eval_files=[ev], bench_files=[bench.parent])   # a folder works too
    keys = [v.key for v in data.variants]
    assert keys == [ids["student"], "http://127.0.0.1:8000/v1#support"]
    student = data.variant("candidate")
    assert student.quality["hard"]["rouge_l"].fmt() == "0.9312 [0.918, 0.944]"
    assert student.quality["test"]["exact_match"].value == 0.97           # manifest numbers kept
    assert student.bench["decode_tok_s"].value == 980.0                   # the file wins over the manifest
    assert student.bench["decode_tok_s"].low == pytest.approx(950.6)
    assert student.by_prompt_tokens["256"]["ttft_s"] == 0.006
    assert student.engine == "torch" and student.templates["hard"].startswith("chat_template")
    remote = data.variant("http://127.0.0.1:8000/v1#support")
    assert remote.kind is None and remote.name == "support@server" and remote.gates_passed is False
    assert data.ratios["student/support@server"]["decode_tok_s"] == 2.178
    assert data.concurrency[0]["concurrency"] == 4
    assert [m["cpu"] for _, m in data.machines] == ["Test CPU 9000"] * 2
    # lineage: the student and its ancestors
    assert {n.id for n in data.nodes} == {ids["student"], ids["teacher"], ids["synthetic"]}
    everything = collect(ws, eval_files=[ev], use_workspace=True)
    assert len(everything.variants) == 6
    # a row naming the artifact by id (eval.json also carries "artifact") joins its artifact
    rows = json.loads(ev.read_text())
    rows["models"][0].update(model=ids["onnx"], artifact=ids["onnx"], name="onnx-int4")
    ev.write_text(json.dumps(rows))
    data = collect(ws, eval_files=[ev])
    onnx = data.variant(ids["onnx"])
    assert onnx.kind == "export" and onnx.parity["mean_kl"] == 0.0408 and "hard" in onnx.quality
    assert onnx.bench["decode_tok_s"].value == 1500.0      # from its manifest


def test_result_files_without_a_workspace(tmp_path, result_files):
    ev, bench = result_files
    data = collect(Workspace(tmp_path / "absent"), eval_files=[ev], bench_files=[bench])
    assert [v.key for v in data.variants] == ["candidate", "http://127.0.0.1:8000/v1#support"]
    assert data.nodes == []
    assert not (tmp_path / "absent").exists()     # reading never creates a workspace


def test_bad_inputs(tmp_path):
    with pytest.raises(BadInputError, match="nothing to report"):
        collect(Workspace(tmp_path / "empty"))
    with pytest.raises(BadInputError, match="not found"):
        collect(None, eval_files=[tmp_path / "missing.json"])
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(BadInputError, match="no 'models' list"):
        collect(None, eval_files=[bad])
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        collect(None, bench_files=[bad])


def test_layered_layout_routes_long_edges_through_empty_slots(lifecycle_ws):
    ws, ids = lifecycle_ws
    lay = layered_layout(collect(ws).nodes)
    layer = {k: lay.pos[i][0] for k, i in ids.items()}
    assert layer == {"data": 0, "teacher": 0, "synthetic": 1, "student": 2, "adapter": 3, "onnx": 4, "gguf": 4}
    via = lay.routes[(ids["teacher"], ids["student"])]
    assert [w[0] for w in via] == [1] and via[0][1] != lay.pos[ids["synthetic"]][1]   # not through a box
    assert [w[0] for w in lay.routes[(ids["student"], ids["gguf"])]] == [3]
    assert lay.routes[(ids["adapter"], ids["gguf"])] == []
    # no two things share a slot
    slots = [p for p in lay.pos.values()] + [w for r in lay.routes.values() for w in r]
    assert len(slots) == len(set(slots))

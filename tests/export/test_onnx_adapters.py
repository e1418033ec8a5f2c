"""LoRA adapters across the ONNX export: merged before export, or exported once as a base with swappable
``.onnx_adapter`` files applied at run time. Either way the greedy output equals the merged torch model's;
an adapter that does not fit the base export is refused (never silently mis-applied)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.adapters.merge import merge_adapter
from slmops.engines import GenerationRequest, open_engine
from slmops.errors import BadInputError
from slmops.export.onnx import export_onnx, export_onnx_adapter, read_lora_slots

from .conftest import make_lora

pytest.importorskip("onnxruntime_genai")  # the export extra: pip install 'slmops[export]'

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def loras(tmp_path_factory, teacher_dir):
    root = tmp_path_factory.mktemp("loras")
    return {
        "qv": make_lora(teacher_dir, root / "qv", seed=1, r=4, scale=0.3),
        "small": make_lora(teacher_dir, root / "small", seed=3, targets=("v_proj", "down_proj"), r=2, alpha=3, scale=0.5),
        "vonly": make_lora(teacher_dir, root / "vonly", seed=4, targets=("v_proj",), r=6, scale=0.3, rslora=True),
        "all": make_lora(teacher_dir, root / "all", seed=2, targets=ALL, r=8, scale=0.2),
    }


@pytest.fixture(scope="module")
def merged(tmp_path_factory, teacher_dir, loras):
    """The torch engine on each adapter merged into the teacher (PEFT merge_and_unload), made on first use."""
    root = tmp_path_factory.mktemp("merged")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = open_engine(merge_adapter(str(teacher_dir), str(loras[name]), root / name)["out_dir"])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def prompts(eval_records):
    return [r["messages"][:1] for r in eval_records[:3]]


def _greedy(engine, prompts, adapter=None, n=20):
    return [r.token_ids for r in engine.generate([GenerationRequest(messages=m, max_new_tokens=n, adapter=adapter)
                                                  for m in prompts])]


@pytest.fixture(scope="module")
def runtime_export(tmp_path_factory, teacher_dir, loras):
    out = tmp_path_factory.mktemp("rt") / "teacher-multi"
    res = export_onnx(teacher_dir, out, precision="fp32", adapter=[f"qv={loras['qv']}", f"small={loras['small']}"],
                      adapter_mode="runtime")
    return res


def test_runtime_adapters_match_the_merged_models(runtime_export, merged, teacher_dir, prompts):
    engine = open_engine(runtime_export.out_dir)
    assert engine.adapters == ["qv", "small"] and engine.default_adapter == "qv"
    base = _greedy(open_engine(teacher_dir), prompts)
    for name in ("qv", "small"):
        want = _greedy(merged(name), prompts)
        assert want != base  # the adapter changes the answers
        assert _greedy(engine, prompts, adapter=name) == want, name
    assert _greedy(engine, prompts) == _greedy(merged("qv"), prompts)  # the default adapter
    assert _greedy(engine, prompts, adapter="base") == base  # every branch off: exactly the base
    # one batch mixing adapters gives each request its own adapter
    mixed = engine.generate([GenerationRequest(messages=prompts[0], max_new_tokens=20, adapter=a)
                             for a in ("small", "base", "qv")])
    assert [r.token_ids for r in mixed] == [_greedy(merged("small"), prompts[:1])[0], base[0],
                                            _greedy(merged("qv"), prompts[:1])[0]]
    info = engine.info()
    assert set(info.extra["adapters"]) == {"qv", "small"} and info.extra["adapter_bytes"]["small"] > 0


def test_runtime_export_has_one_branch_per_adapted_projection(runtime_export):
    slots = read_lora_slots(Path(runtime_export.out_dir))
    assert len(slots) == 4 * 3 * 2  # 4 layers x the union of targets (q, v, down) x (A, B)
    info = json.loads((Path(runtime_export.out_dir) / "export.json").read_text())
    assert info["adapter_mode"] == "runtime" and info["adapters"]["small"] == "adapters/small.onnx_adapter"


def test_another_adapter_added_later_matches_its_merged_model(runtime_export, loras, merged, prompts, tmp_path):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(runtime_export.out_dir, folder)
    path = export_onnx_adapter(loras["vonly"], folder, name="vonly")  # another rank, rsLoRA, a subset of the targets
    assert path.name == "vonly.onnx_adapter"
    engine = open_engine(folder)
    assert engine.adapters == ["qv", "small", "vonly"]
    assert _greedy(engine, prompts, adapter="vonly") == _greedy(merged("vonly"), prompts)
    with pytest.raises(BadInputError, match="exists"):
        export_onnx_adapter(loras["vonly"], folder, name="vonly")


def test_adapter_that_does_not_fit_the_base_export_is_refused(runtime_export, tmp_path, loras, tiny_model_dir):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(runtime_export.out_dir, out)
    before = sorted(p.name for p in (out / "adapters").iterdir())
    with pytest.raises(BadInputError, match="no LoRA branch for"):  # k, o, gate, up: the export adapts q, v, down
        export_onnx_adapter(loras["all"], out, name="all")
    other = make_lora(tiny_model_dir, tmp_path / "tiny-lora", seed=5)  # same targets, another base's shapes
    with pytest.raises(BadInputError, match="maps 64 -> 64 features"):
        export_onnx_adapter(other, out, name="tiny")
    assert sorted(p.name for p in (out / "adapters").iterdir()) == before
    # an adapter file made for another export is refused by the engine too
    import numpy as np

    from slmops.export.onnx import write_adapter_file

    engine = open_engine(out)
    wrong_place = tmp_path / "k.onnx_adapter"  # a projection this export has no branch for
    write_adapter_file({"model.layers.0.attn.k_proj.lora_A.MatMul.weight": np.zeros((256, 4), np.float32)}, wrong_place)
    wrong_shape = tmp_path / "narrow.onnx_adapter"  # another base's width
    write_adapter_file({"model.layers.0.attn.q_proj.lora_A.MatMul.weight": np.zeros((64, 4), np.float32)}, wrong_shape)
    for f in (wrong_place, wrong_shape):
        with pytest.raises(BadInputError, match="does not fit the export"):
            engine.load_adapter("foreign", f)
    assert engine.adapters == ["qv", "small"]
    with pytest.raises(BadInputError, match="no adapter named"):
        engine.generate([GenerationRequest(prompt="x", adapter="missing")])


def test_merged_adapter_export_matches_the_merged_model(tmp_path, teacher_dir, loras, merged, prompts):
    res = export_onnx(teacher_dir, tmp_path / "merged", precision="fp32", adapter=loras["all"])
    assert res.adapter_mode == "merge" and not (tmp_path / "merged" / "adapters").exists()
    engine = open_engine(res.out_dir)
    assert engine.adapters == []
    assert _greedy(engine, prompts) == _greedy(merged("all"), prompts)

"""merge_adapter: the merged model computes what base + adapter computes, is registered with its lineage, and
mismatched adapters are refused with a hint."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from slmops.adapters import find_base, list_adapters, merge_adapter, read_adapter
from slmops.errors import BadInputError, NotFoundError
from slmops.models.load import load_model

from .conftest import make_lora

IDS = torch.tensor([[5, 17, 42, 99, 120, 7, 250, 3]])


def _peft_logits(base_dir, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir))
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _logits(folder):
    with torch.no_grad():
        return load_model(folder)(input_ids=IDS).logits


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model_dir, lora_dirs):
    out = tmp_path / "merged"
    res = merge_adapter(str(tiny_model_dir), str(lora_dirs["b"]), out)
    assert res["out_dir"] == str(out) and res["artifact_id"] is None and res["note"] is None
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged, expected, base = _logits(out), _peft_logits(tiny_model_dir, lora_dirs["b"]), _logits(tiny_model_dir)
    assert torch.allclose(merged, expected, atol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-2)  # the adapter really changes the model
    assert not list(tmp_path.glob(".*partial"))  # nothing left of the atomic write


def test_base_comes_from_the_adapter_when_not_given(tmp_path, tiny_model_dir, lora_dirs):
    info = read_adapter(lora_dirs["a"])
    assert find_base(info) == str(tiny_model_dir.resolve())
    res = merge_adapter(None, str(lora_dirs["a"]), tmp_path / "m")
    assert res["base"] == str(tiny_model_dir.resolve())
    assert torch.allclose(_logits(tmp_path / "m"), _peft_logits(tiny_model_dir, lora_dirs["a"]), atol=1e-4)


def test_merge_registers_lineage(workspace, tmp_path):
    ws, ids = workspace
    res = merge_adapter("tiny", ids["a"], tmp_path / "merged", workspace=ws)
    art = res["artifact_id"]
    assert art and res["base_artifact"] == ids["base"] and res["adapter_artifact"] == ids["a"]
    m = ws.manifest(art)
    assert m.kind == "model" and m.name == "merged" and sorted(m.parents) == sorted([ids["base"], ids["a"]])
    assert m.config["method"] == "lora" and m.metrics["parameters"] > 0
    assert ws.registry.lineage(art)["ancestors"][:2] in ([ids["base"], ids["a"]], [ids["a"], ids["base"]])
    assert ws.verify(art).ok
    assert torch.allclose(_logits(ws.resolve(art)), _logits(tmp_path / "merged"))
    # only the artifact, no folder: the base is the adapter artifact's model parent
    res2 = merge_adapter(None, ids["b"], None, workspace=ws, name="b-merged")
    assert res2["out_dir"] is None and res2["base_artifact"] == ids["base"]
    assert ws.manifest(res2["artifact_id"]).name == "b-merged"


def test_qlora_adapter_merges_into_full_precision_base_with_a_note(tmp_path, tiny_model_dir, caplog):
    adapter = make_lora(tiny_model_dir, tmp_path / "q", seed=3, training={"method": "qlora"})
    with caplog.at_level(logging.WARNING, logger="slmops.adapters"):
        res = merge_adapter(str(tiny_model_dir), str(adapter), tmp_path / "m")
    assert res["method"] == "qlora" and "QLoRA" in res["note"] and "full-precision" in res["note"]
    assert any("QLoRA" in r.getMessage() for r in caplog.records)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("dtype", "float32") == "float32"
    assert torch.allclose(_logits(tmp_path / "m"), _peft_logits(tiny_model_dir, adapter), atol=1e-4)


def _other_base(tmp_path, tiny_model_dir, name, preset="tiny-llama", **overrides):
    import shutil

    from slmops.models.presets import create_model

    folder = tmp_path / name
    model = create_model(preset, vocab_size=load_model(tiny_model_dir).config.vocab_size, seed=0, **overrides)
    model.save_pretrained(folder)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(f, folder / f.name)
    return folder


def _anonymous(tmp_path, adapter_dir):
    """A copy of the adapter that does not say which base it was trained on."""
    import shutil

    folder = tmp_path / f"anon-{adapter_dir.name}"
    shutil.copytree(adapter_dir, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_mismatched_adapters_are_refused(tmp_path, tiny_model_dir, lora_dirs):
    known, anon = lora_dirs["a"], _anonymous(tmp_path, lora_dirs["a"])
    wider = _other_base(tmp_path, tiny_model_dir, "wider", hidden_size=128)
    # the adapter names its base: the configs are compared before any weight is applied
    with pytest.raises(BadInputError, match="architecture differs from this base: hidden_size 64") as e:
        merge_adapter(str(wider), str(known), tmp_path / "m1")
    assert "apply it to" in str(e.value)
    # it does not: PEFT's shape check, explained
    with pytest.raises(BadInputError, match="weight shapes differ"):
        merge_adapter(str(wider), str(anon), tmp_path / "m1")
    deeper = _other_base(tmp_path, tiny_model_dir, "deeper", num_hidden_layers=3)
    with pytest.raises(BadInputError, match="does not fit this base model: .*have no weights"):
        merge_adapter(str(deeper), str(anon), tmp_path / "m2")
    shallower = _other_base(tmp_path, tiny_model_dir, "shallower", num_hidden_layers=1)
    with pytest.raises(BadInputError, match="does not fit this base model: .*no place in this base"):
        merge_adapter(str(shallower), str(anon), tmp_path / "m3")
    with pytest.raises(BadInputError, match="num_hidden_layers 2"):
        merge_adapter(str(shallower), str(known), tmp_path / "m3")
    qwen = _other_base(tmp_path, tiny_model_dir, "qwen", preset="tiny-qwen2")  # same shapes, other architecture
    with pytest.raises(BadInputError, match="model_type llama"):
        merge_adapter(str(qwen), str(known), tmp_path / "m4")
    with pytest.raises(BadInputError, match="does not say which base"):
        merge_adapter(None, str(anon), tmp_path / "m5")
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 6))


def test_bad_references_and_outputs(tmp_path, tiny_model_dir, lora_dirs):
    with pytest.raises(BadInputError, match="not an adapter folder"):
        merge_adapter(str(tiny_model_dir), str(tiny_model_dir), tmp_path / "m")
    with pytest.raises(NotFoundError):
        merge_adapter(str(tiny_model_dir), str(tmp_path / "nope"), tmp_path / "m")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with pytest.raises(BadInputError, match="not empty"):
        merge_adapter(str(tiny_model_dir), str(lora_dirs["a"]), busy)
    merge_adapter(str(tiny_model_dir), str(lora_dirs["a"]), busy, overwrite=True)
    assert not (busy / "x").exists() and (busy / "model.safetensors").exists()
    with pytest.raises(BadInputError, match="nowhere"):
        merge_adapter(str(tiny_model_dir), str(lora_dirs["a"]), None)


def test_list_adapters_filters_by_base(workspace):
    ws, ids = workspace
    rows = list_adapters(ws)
    assert {r["id"] for r in rows} == {ids["a"], ids["b"], ids["c"]}
    by_id = {r["id"]: r for r in rows}
    assert by_id[ids["a"]]["base"] == ids["base"] and by_id[ids["a"]]["method"] == "lora"
    assert by_id[ids["a"]]["r"] == 4 and by_id[ids["b"]]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert {r["id"] for r in list_adapters(ws, base="tiny")} == {ids["a"], ids["b"]}
    assert {r["id"] for r in list_adapters(ws, base=ids["other"])} == {ids["c"]}
    assert {r["id"] for r in list_adapters(ws, base=str(ws.resolve(ids["other"])))} == {ids["c"]}
    assert list_adapters(ws, base=ids["a"]) == []
    with pytest.raises(NotFoundError):
        list_adapters(ws, base="no-such-model")

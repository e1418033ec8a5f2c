"""Fine-tuning: full / LoRA / QLoRA on tiny models, masking per data format, resume, custom loss, recipes,
the QLoRA gradient check against a dequantised dense copy, CLI and `accelerate launch` with 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.errors import BadInputError
from slmops.finetune import FinetuneConfig, run_finetune
from slmops.training.common import IGNORE_INDEX

SRC = Path(__file__).resolve().parents[2] / "src"
FAST = dict(batch_size=4, threads=1, logging_steps=1, val_fraction=0.0, tensorboard=False)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, demo_examples) -> Path:
    from slmops.demo.task import to_chat_row

    path = tmp_path_factory.mktemp("ftdata") / "train.jsonl"
    path.write_text("".join(json.dumps(to_chat_row(ex)) + "\n" for ex in demo_examples[:64]))
    return path


def state(folder: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def base_state(model_dir: Path) -> dict:
    return {k: v.clone() for k, v in state(model_dir).items()}


# ---------------------------------------------------------------------------------------------- methods


def test_lora_trains_only_the_adapter_and_leaves_the_base_alone(tiny_model_dir, chat_file, tmp_path):
    import torch

    before = base_state(tiny_model_dir)
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="lora", max_steps=4, lr=1e-2,
                         lora={"r": 4, "alpha": 8}, **FAST)
    report = run_finetune(cfg, tmp_path / "lora")
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["r"] == 4 and acfg["lora_alpha"] == 8 and acfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapter = state(out, "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    # lora_B starts at zero: after training it is not, so the adapter really learned
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    # the base folder is untouched, and the trainable share is the adapter's only
    assert all(torch.equal(before[k], v) for k, v in state(tiny_model_dir).items())
    assert 0 < report.trainable_parameters == sum(v.numel() for v in adapter.values())
    assert report.trainable_share < 0.5 and report.steps == 4 and report.method == "lora"


def test_lora_base_weights_stay_frozen_during_training(tiny_model_dir, chat_file, tmp_path):
    """Inside the trained PeftModel every base weight equals the original; only lora_* weights moved."""
    import torch
    from peft import PeftModel

    from slmops.models.load import load_model

    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="lora", max_steps=3, lr=1e-2, **FAST)
    run_finetune(cfg, tmp_path / "a")
    base = load_model(str(tiny_model_dir))
    original = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    for name, tensor in peft.base_model.model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, original[key]), name


def test_full_finetune_changes_every_weight(tiny_model_dir, chat_file, tmp_path):
    import torch

    before = base_state(tiny_model_dir)
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="full", max_steps=3, lr=1e-3, **FAST)
    report = run_finetune(cfg, tmp_path / "full")
    after = state(tmp_path / "full")
    changed = [k for k in before if not torch.allclose(before[k], after[k])]
    assert set(changed) == set(before)  # every tensor (norms included) moved
    assert report.trainable_share == 1.0 and report.trainable_parameters == report.parameters


def test_qlora_trains_a_4bit_base(tiny_model_dir, chat_file, tmp_path):
    from slmops.finetune.lora import qlora_unavailable_reason

    if qlora_unavailable_reason():
        pytest.skip(qlora_unavailable_reason())
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="qlora", max_steps=3, lr=1e-2, **FAST)
    report = run_finetune(cfg, tmp_path / "q")
    assert report.quantized_layers > 0 and report.method == "qlora"
    assert (tmp_path / "q" / "adapter_model.safetensors").is_file()
    training = json.loads((tmp_path / "q" / "training.json").read_text())
    assert training["method"] == "qlora"


def test_qlora_gradients_match_a_dequantised_dense_copy(tiny_model_dir, tmp_path):
    """The LoRA gradients on the 4-bit base equal those on a dense fp32 copy of the dequantised weights, also
    after a no-grad forward (which, without our fix, repacks the 4-bit weights on AVX512-BF16 CPUs and makes
    the gradients silently wrong)."""
    import torch

    from slmops.finetune.lora import qlora_unavailable_reason

    if qlora_unavailable_reason():
        pytest.skip(qlora_unavailable_reason())
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import get_peft_model

    from slmops.finetune.config import LoraSettings
    from slmops.finetune.lora import fix_cpu_4bit, lora_config, quantization_config
    from slmops.models.load import load_model

    q = load_model(str(tiny_model_dir), dtype="float32", quantization_config=quantization_config(str(tiny_model_dir)))
    assert fix_cpu_4bit(q) > 0
    dense = load_model(str(tiny_model_dir), dtype="float32")
    dense_mods = dict(dense.named_modules())
    for name, m in q.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            dense_mods[name].weight.data = dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    pq = get_peft_model(q, lora_config(settings, "llama"))
    pd = get_peft_model(dense, lora_config(settings, "llama"))
    torch.manual_seed(0)
    lora_q = {n: p for n, p in pq.named_parameters() if p.requires_grad}
    lora_d = dict(pd.named_parameters())
    for n, p in lora_q.items():  # same non-zero adapter on both
        p.data = torch.randn_like(p) * 0.05
        lora_d[n].data = p.data.clone()
    ids = torch.randint(0, q.config.vocab_size, (2, 24))
    with torch.no_grad():
        pq(input_ids=ids)  # the inference forward that triggered the repacking bug
    pq(input_ids=ids, labels=ids).loss.backward()
    pd(input_ids=ids, labels=ids).loss.backward()
    for n, p in lora_q.items():
        ref = lora_d[n].grad
        rel = (p.grad - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < 1e-3, (n, float(rel))


def test_qlora_unavailable_fails_before_loading(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    import slmops.finetune.lora as lora
    import slmops.models.load as load

    monkeypatch.setattr(lora, "qlora_unavailable_reason", lambda: "bitsandbytes is not installed")
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="qlora", max_steps=1, **FAST)
    with pytest.raises(BadInputError) as exc:
        run_finetune(cfg, tmp_path / "q")
    assert "QLoRA" in str(exc.value) and "--method lora" in exc.value.hint


# ------------------------------------------------------------------------------------------------- data


FORMAT_ROWS = {
    "chat": ({"messages": [{"role": "user", "content": "ping 12"}, {"role": "assistant", "content": "pong 12"}]}, {}),
    "prompt-completion": ({"prompt": "ping 12", "completion": "pong 12"}, {}),
    "input-output": ({"input": "ping 12", "output": "pong 12"}, {}),
    "template": ({"q": "12", "a": "pong 12"}, {"format": "template", "template": "ping {q}", "completion_field": "a"}),
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_labels_are_the_answer_tokens_only_in_every_format(fmt, tiny_model_dir, tmp_path):
    from slmops.finetune.train import load_rows
    from slmops.models.load import load_tokenizer
    from slmops.training.common import tokenize_rows

    record, extra = FORMAT_ROWS[fmt]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(path), **extra, val_fraction=0)
    rows, _, _ = load_rows(cfg, str(path), None)
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "pong 12"}
    [enc], _ = tokenize_rows(tok, rows, 512)
    labelled = tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX])
    assert labelled.startswith("pong 12") and "ping" not in labelled
    [everything], _ = tokenize_rows(tok, rows, 512, train_on_inputs=True)
    assert everything["labels"] == everything["input_ids"]


def test_packing_fills_rows_and_restarts_positions(tiny_model_dir, chat_file, tmp_path):
    from slmops.training.common import ChatCollator, pack_rows

    rows = [{"input_ids": [1] * n, "labels": [2] * n} for n in (30, 20, 50, 10, 40)]
    packed = pack_rows(rows, 64)
    assert sorted(len(p["input_ids"]) for p in packed) == [30, 60, 60]  # first-fit decreasing
    assert all(p["position_ids"][0] == 0 for p in packed) and sum(len(p["labels"]) for p in packed) == 150
    batch = ChatCollator(0)(packed)
    assert batch["position_ids"].shape == batch["input_ids"].shape
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="lora", max_steps=2, packing=True,
                         max_length=256, **FAST)
    report = run_finetune(cfg, tmp_path / "p")
    assert report.packed_rows is not None and report.packed_rows < report.train_rows


# ----------------------------------------------------------------------------------- resume, loss, best


def test_resume_continues_the_step_count(tiny_model_dir, chat_file, tmp_path):
    import torch
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):  # a run killed right after its step-3 checkpoint
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    # no LoRA dropout: the comparison with an uninterrupted run is then exact
    common = dict(model=str(tiny_model_dir), data=str(chat_file), method="lora", max_steps=6, save_every=3,
                  lr=5e-3, lora={"dropout": 0.0}, **FAST)
    assert run_finetune(FinetuneConfig(**common), tmp_path / "run", callbacks=[StopAt3()]).steps == 3
    resumed = run_finetune(FinetuneConfig(**common, resume=True), tmp_path / "run")
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.steps == 6
    assert [h["step"] for h in resumed.loss_history if "loss" in h] == [4, 5, 6]
    run_finetune(FinetuneConfig(**common), tmp_path / "straight")
    a = state(tmp_path / "run", "adapter_model.safetensors")
    b = state(tmp_path / "straight", "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_custom_loss_from_the_users_module(tiny_model_dir, chat_file, tmp_path):
    module = tmp_path / "my_losses.py"
    calls = tmp_path / "calls.txt"
    module.write_text(
        "import torch.nn.functional as F\n"
        f"CALLS = {str(calls)!r}\n"
        "def doubled(outputs, labels, num_items_in_batch=None):\n"
        "    open(CALLS, 'a').write('x')\n"
        "    logits = outputs.logits[:, :-1].float()\n"
        "    return 2 * F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),"
        " ignore_index=-100)\n"
    )
    base = dict(model=str(tiny_model_dir), data=str(chat_file), method="lora", max_steps=2, lr=1e-9, **FAST)
    plain = run_finetune(FinetuneConfig(**base), tmp_path / "plain")
    custom = run_finetune(FinetuneConfig(**base, loss=f"{module}:doubled"), tmp_path / "custom")
    assert calls.read_text().count("x") >= 2
    first = [h["loss"] for h in custom.loss_history if "loss" in h][0]
    ref = [h["loss"] for h in plain.loss_history if "loss" in h][0]
    assert first == pytest.approx(2 * ref, rel=0.02)
    with pytest.raises(BadInputError, match="no function"):
        run_finetune(FinetuneConfig(**base, loss=f"{module}:nope"), tmp_path / "bad")


def test_validation_keeps_the_best_checkpoint_and_writes_tensorboard(tiny_model_dir, chat_file, tmp_path):
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(chat_file), method="lora", max_steps=4, eval_every=2,
                         lr=5e-3, **{**FAST, "val_fraction": 0.25, "tensorboard": True})
    report = run_finetune(cfg, tmp_path / "v")
    assert report.val_rows == 16 and report.best_step in (2, 4)
    assert report.val_loss == pytest.approx(report.best_val_loss)
    assert list((tmp_path / "v" / "runs").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------- config, CLI


def test_recipe_keys_are_checked_with_the_key_and_line_named(tmp_path):
    from slmops.config import load_yaml_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d.jsonl\nmethod: lora\nlora:\n  rank: 8\n")
    with pytest.raises(BadInputError) as exc:
        load_yaml_config(recipe, FinetuneConfig)
    assert "r.yaml:5: lora.rank: unknown key" in str(exc.value)
    recipe.write_text("model: m\ndata: d.jsonl\nmethod: qlora8\n")
    with pytest.raises(BadInputError, match="method"):
        load_yaml_config(recipe, FinetuneConfig)
    assert FinetuneConfig(model="m", data="d").learning_rate == 2e-4
    assert FinetuneConfig(model="m", data="d", method="full").learning_rate == 5e-5
    assert FinetuneConfig(model="m", data="d", lora={"target_modules": "q_proj, v_proj"}).lora.target_modules == [
        "q_proj", "v_proj"]


def test_example_recipes_validate():
    from slmops.config import load_yaml_config

    recipes = sorted((Path(__file__).resolve().parents[2] / "examples" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_yaml_config(path, FinetuneConfig)


def test_cli_dry_run_prints_the_memory_estimate_and_loads_no_weights(tiny_model_dir, tmp_path):
    code = (
        "import sys\n"
        "import slmops.models.load as load\n"
        "load.load_model = lambda *a, **k: sys.exit('weights loaded')\n"
        "from slmops.cli.app import run\n"
        f"rc = run(['finetune', '--model', {str(tiny_model_dir)!r}, '--data', 'd.jsonl', '--out', 'o', "
        "'--method', 'lora', '--lora-r', '4', '--target-modules', 'q_proj,v_proj', '--dry-run'])\n"
        "print('RC', rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "RC 0" in out and "memory estimate" in out and "r: 4" in out and "- q_proj" in out
    # q and v projections of a 64-wide, 2-layer model with r=4: 2 layers * (4*(64+64) + 4*(64+32))
    assert "1,792 of" in out


def test_cli_trains_an_adapter_registered_with_its_base(tiny_model_dir, chat_file, tmp_path):
    from slmops.cli.app import run
    from slmops.workspace import Workspace

    ws = tmp_path / "ws"
    w = Workspace(ws)
    base_id = w.import_folder(tiny_model_dir, "model", "base").id
    w.registry.set_alias("base", base_id)
    rc = run(["-q", "-w", str(ws), "finetune", "--model", "base", "--data", str(chat_file), "--out",
              str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0",
              "--threads", "1", "--no-tensorboard", "--json"])
    assert rc == 0
    adapters = w.registry.list("adapter")
    assert len(adapters) == 1
    assert w.registry.parents(adapters[0]["id"]) == [base_id]
    acfg = json.loads((ws / "artifacts" / adapters[0]["id"] / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(ws.resolve() / "artifacts" / base_id)


def test_accelerate_launch_two_cpu_processes(tiny_model_dir, chat_file, tmp_path):
    """`accelerate launch` (torchrun, gloo on CPU) runs the unchanged CLI in 2 processes; rank 0 writes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port),
           "-m", "slmops", "-q", "-w", str(tmp_path / "ws"), "finetune", "--out", str(out), "--model",
           str(tiny_model_dir), "--data", str(chat_file), "--method", "lora", "--max-steps", "3",
           "--batch-size", "4", "--threads", "1", "--val-fraction", "0.25", "--json"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["steps"] == 3
    assert proc.stdout.count('"world_size"') == 1
    assert (out / "adapter_model.safetensors").is_file()

"""Peers as clients: lm-evaluation-harness drives our server through its `local-chat-completions` and
`local-completions` models, on a tiny local task (8 demo-task prompts in a JSONL file, no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.serve.manager import ModelSpec

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]

TASK = """\
task: slmops_demo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 96
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _task(tmp_path: Path) -> Path:
    from slmops.demo.task import generate, to_chat_row

    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for ex in generate(8, seed=5):
            msgs = to_chat_row(ex)["messages"]
            f.write(json.dumps({"question": msgs[-2]["content"], "answer": msgs[-1]["content"]}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "slmops_demo.yaml").write_text(TASK.format(data=data))
    return tmp_path / "tasks"


def _lm_eval(tmp_path: Path, tasks: Path, model: str, args: str, *extra: str) -> float:
    out = tmp_path / f"out-{model}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, *extra,
                           "--tasks", "slmops_demo", "--include_path", str(tasks), "--output_path", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    return float(result["results"]["slmops_demo"]["exact_match,none"])


def test_lm_eval_harness_against_our_server(start_server, tmp_path):
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR

    srv = start_server([ModelSpec(ref=str(BUNDLED_TEACHER_DIR), name="teacher")])
    tasks = _task(tmp_path)
    chat = _lm_eval(tmp_path, tasks, "local-chat-completions",
                    f"model=teacher,base_url={srv.url}/v1/chat/completions,num_concurrent=4,max_retries=1,"
                    "tokenizer_backend=None", "--apply_chat_template")
    assert chat == 1.0  # the teacher labels the demo task perfectly through its chat template
    raw = _lm_eval(tmp_path, tasks, "local-completions",
                   f"model=teacher,base_url={srv.url}/v1/completions,num_concurrent=2,max_retries=1,"
                   "tokenizer_backend=None,tokenized_requests=False")
    assert 0.0 <= raw <= 1.0  # raw prompts (no chat template): the run completes; the score is low by design

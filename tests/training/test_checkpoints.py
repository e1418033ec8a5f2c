"""Resuming after a crash: a checkpoint the crash left half-written is removed, the last complete one is used."""

from __future__ import annotations

import json
import logging

from slmops.training.common import clean_checkpoints, prepare_checkpoints


def _ckpt(root, step, complete=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_half_written_checkpoint_is_removed_and_the_last_complete_one_resumes(tmp_path):
    _ckpt(tmp_path, 4)
    _ckpt(tmp_path, 8, complete=False)  # killed while saving: no trainer_state.json yet
    torn = _ckpt(tmp_path, 12)
    (torn / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    last = prepare_checkpoints(tmp_path, resume=True, rank=0, log=logging.getLogger("t"))
    assert last is not None and last.endswith("checkpoint-4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    assert clean_checkpoints(tmp_path) == [] and clean_checkpoints(tmp_path / "none") == []


def test_fresh_run_removes_old_checkpoints(tmp_path):
    _ckpt(tmp_path, 4)
    assert prepare_checkpoints(tmp_path, resume=False, rank=0, log=logging.getLogger("t")) is None
    assert not list(tmp_path.glob("checkpoint-*"))

"""`slmops demo ...`: the bundled demo task and teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app

demo_app = typer.Typer(help="The bundled demo: a customer-support triage task and its tiny teacher.",
                       no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@demo_app.command("data")
def data(
    out: Annotated[Path, typer.Option(help="Folder for train/val/test/prompts/gold JSONL files.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
    hard: Annotated[bool, typer.Option(help="The harder variant: longer messages with distracting entities.")] = False,
) -> None:
    """Write the demo task's splits (chat JSONL), unlabeled prompts and a small gold set."""
    from slmops.demo.task import write_demo_data

    paths = write_demo_data(out, seed=seed, hard=hard)
    for name, path in paths.items():
        common.console.print(f"{name:8s} {path}")


@demo_app.command("finetune-data")
def finetune_data(
    out: Annotated[Path, typer.Option(help="Folder for train/val/test/test_base JSONL files and task.json.")],
    task: Annotated[str, typer.Option(help="Extension task: gifts (gift_card, price_match) or subscriptions (pause_subscription, loyalty_points).")] = "gifts",
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same files.")] = 0,
    train: Annotated[int, typer.Option(help="Rows in train.jsonl.")] = 1000,
    replay: Annotated[float, typer.Option(help="Share of train/val rows taken from the original task, so a fine-tune keeps it.")] = 0.25,
) -> None:
    """Write a fine-tuning set with intents the demo models have never seen.

    test.jsonl holds only the new intents (the new capability); test_base.jsonl only the original task
    (the forgetting check). Train on the folder with `slmops finetune --data OUT`.
    """
    from slmops.demo.task import FinetuneSizes, write_finetune_data

    files = write_finetune_data(out, task, seed=seed, replay=replay,
                                sizes=FinetuneSizes(train=train, val=max(1, train // 10)))
    for name in ("train", "val", "test", "test_base", "task_file"):
        common.console.print(f"{name:9s} {files[name]}")
    common.console.print(f"new intents: {', '.join(files['intents'])}")


@demo_app.command("train-teacher")
def train_teacher_cmd(
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warm-up then cosine).")] = 2e-3,
    seed: Annotated[int, typer.Option(help="Seed for data, tokenizer and weights.")] = 0,
    name: Annotated[str, typer.Option(help="Name to register the teacher under.")] = "demo-teacher",
    bundle: Annotated[bool, typer.Option(help="Also replace the teacher bundled in the package (maintainers).")] = False,
) -> None:
    """Train the demo teacher from scratch (about 30 minutes on 2 CPU cores) and register it.

    The bundled teacher was made by this command with the defaults; its settings and wall time are in its
    manifest (`slmops models show demo-teacher`).
    """
    from slmops.demo.teacher import BUNDLED_TEACHER_DIR, TeacherSettings, train_teacher

    settings = TeacherSettings(seed=seed, steps=steps, batch_size=batch_size, lr=lr)
    ws = common.get_workspace()
    with common.progress("training teacher", total=steps) as advance, \
            ws.create_artifact("model", name, config={}) as w:
        record = train_teacher(w.path, settings, progress=lambda i, n, loss: advance(1, status=f"loss {loss:.3f}"))
        (w.path / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        w.config = record
        w.metrics = {"parameters": record["parameters"], "train_wall_time_s": record["wall_time_s"]}
        art_id = w.id
    folder = ws.resolve(art_id)
    common.console.print(f"teacher {art_id}: {record['parameters']:,} parameters, {record['wall_time_s']:.0f} s, "
                         f"final loss {record['final_loss']}")
    if bundle:
        tmp = BUNDLED_TEACHER_DIR.with_name("teacher.new")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("slmops.json"))
        shutil.rmtree(BUNDLED_TEACHER_DIR, ignore_errors=True)
        tmp.rename(BUNDLED_TEACHER_DIR)
        common.console.print(f"bundled teacher replaced: {BUNDLED_TEACHER_DIR}")

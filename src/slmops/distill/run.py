"""Both stages in one call: the teacher labels prompts, the student trains on the kept answers, and teacher
and student are compared side by side on a held-out test file (`slmops distill run`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError


@dataclass
class DistillOutcome:
    dataset_id: str | None
    student_dir: Path
    student_id: str | None
    comparison: dict[str, Any] | None
    report_md: Path | None
    filters: dict[str, Any]
    training: dict[str, Any]


def run_distillation(
    teacher: str,
    prompts: str | Path,
    out_dir: str | Path,
    *,
    workspace=None,
    student: str | None = None,
    student_preset: str | None = "demo-student",
    test: str | Path | None = None,
    filters=None,
    generation: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    eval_limit: int | None = None,
    progress: Callable | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> DistillOutcome:
    """Stage 1 into ``<out>/synthetic``, stage 2 into ``<out>/student``, comparison into ``<out>/report.md``
    and ``<out>/report.json``. A URL teacher gets sequence-level training only (no logits to distil)."""
    from contextlib import nullcontext

    from slmops.data import load_dataset_file
    from slmops.distill import FilterConfig, build_dataset, generate_synthetic, open_teacher, register_dataset
    from slmops.distill.compare import compare_models, comparison_markdown
    from slmops.distill.train import StudentTrainConfig, train_student

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = progress or (lambda *a, **k: nullcontext(lambda *a, **k: None))
    generation = dict(generation or {})
    remote = teacher.startswith(("http://", "https://"))
    # validate everything cheap before the long stages start
    prompt_rows = load_dataset_file(prompts, purpose="prompts").prompts()
    if test is not None:
        load_dataset_file(test, purpose="train")
    train_cfg = dict(training or {})
    train_cfg.setdefault("kd_alpha", 0.0 if remote else 0.5)
    if remote and train_cfg["kd_alpha"] > 0:
        raise BadInputError("logit-level KD needs a local teacher; a URL teacher gives text only",
                            "set kd_alpha to 0 (sequence-level distillation)")
    synthetic = out / "synthetic"
    t = open_teacher(teacher, workspace, max_batch_size=generation.pop("batch_size", 32))
    try:
        log(f"stage 1: {t.name} labels {len(prompt_rows)} prompts")
        with bar("teacher labelling", total=None) as advance:
            report = generate_synthetic([t], prompt_rows, synthetic, progress=advance, workspace=workspace,
                                        **{"max_new_tokens": 128, **generation})
    finally:
        t.engine.close()
    filters = filters or FilterConfig(json_valid=False)
    outcome = build_dataset(synthetic, report.hashes, filters)
    log(f"kept {outcome.summary['kept']} of {outcome.summary['total']}: rejected {outcome.summary['rejected']}")
    if not outcome.summary["kept"]:
        raise BadInputError("the filters rejected every teacher answer; nothing to train on",
                            f"see {synthetic / 'rejected.jsonl'}")
    dataset_id = None
    parents = [t.artifact_id] if t.artifact_id else []
    if workspace is not None:
        manifest, _ = register_dataset(workspace, synthetic, name=f"distill-{out.name}", hashes=report.hashes,
                                       parents=parents, config={"teacher": teacher, "prompts": str(prompts),
                                                                "sampling": report.sampling,
                                                                "filters": filters.to_dict()})
        dataset_id = manifest.id
    # a URL teacher has no tokenizer to hand a preset student, and no logits for KD
    tokenizer = _require_tokenizer(train_cfg) if remote and not student else None
    cfg = StudentTrainConfig(
        student=student, student_preset=None if student else student_preset,
        teacher=None if remote else teacher, tokenizer=tokenizer, data=dataset_id or str(synthetic),
        **{k: v for k, v in train_cfg.items() if k != "tokenizer"},
    )
    log(f"stage 2: training {'student ' + student if student else 'a ' + str(student_preset) + ' student'}"
        f" ({'logit KD alpha ' + str(cfg.kd_alpha) if cfg.kd_alpha else 'sequence-level'})")
    with bar("student training", total=cfg.max_steps) as advance:
        train_report = train_student(cfg, out / "student", workspace=workspace, progress=advance)
    comparison = report_md = None
    student_ref = train_report.artifact_id or str(out / "student")
    if test is not None:
        log("comparing teacher and student on the test file")
        comparison = compare_models({"teacher": teacher, "student": student_ref}, test, reference="teacher",
                                    workspace=workspace, limit=eval_limit)
        for r in comparison["rows"]:
            r.pop("scores", None)
        (out / "report.json").write_text(json.dumps(comparison, indent=2, default=str) + "\n")
        report_md = out / "report.md"
        report_md.write_text("# Distillation: teacher vs student\n\n" + comparison_markdown(comparison))
        if workspace is not None and train_report.artifact_id:
            student_row = next(r for r in comparison["rows"] if r["model"] == "student")
            workspace.update_metrics(train_report.artifact_id, {
                "exact_match": student_row["exact_match"], "retention": student_row["retention"],
                "decode_speedup": student_row["decode_speedup"], "param_ratio": student_row["param_ratio"]})
    return DistillOutcome(dataset_id, out / "student", train_report.artifact_id, comparison, report_md,
                          outcome.summary, train_report.to_dict())


def _require_tokenizer(train_cfg: dict[str, Any]) -> str:
    tok = train_cfg.get("tokenizer")
    if not tok:
        raise BadInputError("a URL teacher has no tokenizer to give a preset student",
                            "pass --tokenizer DIR for the student, or --student MODEL")
    return tok

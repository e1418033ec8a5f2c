"""Distillation: a teacher's answers become a student's training data, then the student is trained.

- Stage 1 (this package's top level): teacher generation, resumable and lossless (`generate`), checks
  and filters on teacher outputs (`filters`), the filtered chat dataset and its artifact (`dataset`).
- Stage 2: student training with optional logit-level KD (`slmops.distill.train`, `kd`, `compat`; import
  them directly: they are not imported here, so importing this package stays light).

Stage 1, typical use::

    from slmops.data import load_dataset_file
    from slmops.distill import FilterConfig, build_dataset, generate_synthetic

    prompts = load_dataset_file("prompts.jsonl", purpose="prompts").prompts()
    report = generate_synthetic(["http://127.0.0.1:8000/v1"], prompts, "runs/d1", num_samples=3,
                                temperature=0.7)            # GenerationFailed under min_success
    outcome = build_dataset("runs/d1", report.hashes, FilterConfig(json_valid=True, min_agreement=0.6))

See docs/distill.md for the file formats, resume semantics and filters.
"""

from __future__ import annotations

from slmops.distill.dataset import REJECTED, TRAIN, build_dataset, register_dataset
from slmops.distill.filters import (
    DEFAULT_REFUSALS,
    REASONS,
    FilterConfig,
    FilterOutcome,
    SampleChecker,
    apply_filters,
    filter_rows,
    near_duplicates,
    vote_key,
)
from slmops.distill.generate import (
    FAILURES,
    GENERATIONS,
    SUMMARY,
    GenerateReport,
    GenerationFailed,
    Teacher,
    generate_synthetic,
    open_teacher,
    read_rows,
    repair_and_index,
)

__all__ = [
    "DEFAULT_REFUSALS", "FAILURES", "GENERATIONS", "REASONS", "REJECTED", "SUMMARY", "TRAIN",
    "FilterConfig", "FilterOutcome", "GenerateReport", "GenerationFailed", "SampleChecker", "Teacher",
    "apply_filters", "build_dataset", "filter_rows", "generate_synthetic", "near_duplicates", "open_teacher",
    "read_rows", "register_dataset", "repair_and_index", "vote_key",
]

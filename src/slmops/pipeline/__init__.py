"""Pipelines: one YAML file runs the whole life of a model, with caching, resume and a dry-run plan.

    from slmops.pipeline import load_pipeline, run_pipeline

    pipe = load_pipeline("examples/quickstart.yaml", overrides=["vars.distill_steps=20"], workspace=ws)
    result = run_pipeline(pipe, ws, dry_run=True)     # what would run, what is cached, and why
    print(result.table())
    result = run_pipeline(pipe, ws, resume=True)      # GateFailedError (exit 3) when a gate step fails

`slmops run PIPELINE.yaml` is the command; docs/pipeline.md describes the file format.
"""

from slmops.pipeline.plan import Pipeline, Step, load_pipeline
from slmops.pipeline.runner import RunResult, StepResult, run_pipeline, state_dir
from slmops.pipeline.spec import KINDS, PipelineSpec, StepSpec

__all__ = ["KINDS", "Pipeline", "PipelineSpec", "RunResult", "Step", "StepResult", "StepSpec", "load_pipeline",
           "run_pipeline", "state_dir"]

"""A Foundry Local custom-model folder: the ONNX export plus ``inference_model.json``.

Foundry Local runs ONNX Runtime GenAI folders; a custom model carries ``inference_model.json`` beside
``genai_config.json``::

    {"Name": "support-triage", "Version": "1",
     "PromptTemplate": {"system": "<|im_start|>system\\n{Content}<|im_end|>\\n", "user": ..., "assistant": ...,
                        "prompt": "<|im_start|>user\\n{Content}<|im_end|>\\n<|im_start|>assistant\\n"},
     "ModelConfig": {"context_length": 512, "max_length": 512, "do_sample": false, "temperature": 1.0,
                     "top_k": 50, "top_p": 1.0, "stop": ["<|im_end|>"]}}

The PromptTemplate is derived from the model's own chat template by rendering it
(:mod:`slmops.models.templates`); a template that is not a plain per-role wrapper is refused before any
work. ModelConfig holds the generation defaults of the export's ``genai_config.json`` (search section) and
the end-of-turn strings. With `gguf`, an Ollama ``Modelfile`` is written beside that GGUF file
(:func:`slmops.export.gguf.write_modelfile`), so the same model can be dropped into either runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError

INFERENCE_MODEL = "inference_model.json"


@dataclass
class FoundryResult:
    export: Any  # slmops.export.onnx.ExportResult
    inference_model: dict[str, Any] = field(default_factory=dict)
    modelfile: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"export": self.export.to_dict(), "inference_model": self.inference_model, "modelfile": self.modelfile}


def inference_model_json(chat_template: str, *, name: str, version: str = "1", bos_token: str = "",
                         eos_token: str = "", system_prompt: str | None = None,
                         genai_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The contents of ``inference_model.json`` for a model with `chat_template` (see the module docstring).
    Raises ``BadInputError`` for a chat template that cannot be expressed as a PromptTemplate."""
    from slmops.models.templates import chat_template_to_prompt_template

    prompt_template = chat_template_to_prompt_template(chat_template, bos_token=bos_token, eos_token=eos_token,
                                                       system_prompt=system_prompt)
    model_cfg = (genai_config or {}).get("model", {})
    search = (genai_config or {}).get("search", {})
    config: dict[str, Any] = {}
    if model_cfg.get("context_length"):
        config["context_length"] = model_cfg["context_length"]
    for key in ("max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
        if key in search:
            config[key] = search[key]
    stops = [s for s in (eos_token,) if s]
    if stops:
        config["stop"] = stops
    return {"Name": name, "Version": str(version), "PromptTemplate": prompt_template, "ModelConfig": config}


def _token_text(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return str(value or "")


def _special_tokens(folder: Path) -> tuple[str, str]:
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))


def export_foundry(
    model: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "int4",
    adapter=None,
    gguf: str | Path | None = None,
    model_name: str | None = None,
    version: str = "1",
    system_prompt: str | None = None,
    execution_provider: str = "cpu",
    int4_block_size: int = 32,
    int4_symmetric: bool = True,
    int4_accuracy_level: int = 4,
    force: bool = False,
    workspace=None,
    name: str | None = None,
    eval_records: list[dict] | None = None,
    eval_texts: list[str] | None = None,
    max_ppl_increase: float | None = None,
    min_task_retention: float | None = None,
    progress=None,
) -> FoundryResult:
    """Export `model` (with `adapter` merged in, when given) as a Foundry Local model folder `out_dir`:
    :func:`slmops.export.onnx.export_onnx` plus ``inference_model.json`` named `model_name` (default: the
    folder name) and `version`. The chat template is checked first: one Foundry Local cannot express is a
    ``BadInputError`` before any work. `gguf`: a GGUF file of the same model to write an Ollama Modelfile
    beside. The other arguments are those of ``export_onnx``; the bundle is registered as an ``export``
    artifact with a workspace."""
    from slmops.export.onnx import _chat_template, _resolve_model, export_onnx

    out = Path(out_dir).expanduser().resolve()
    model_name = model_name or out.name
    gguf_path = Path(gguf).expanduser() if gguf is not None else None
    if gguf_path is not None and not gguf_path.is_file():
        raise NotFoundError(f"no such GGUF file: {gguf_path}", "export one with `slmops export gguf` first")

    # the chat template must convert before anything is built
    model_dir, _ = _resolve_model(model, workspace)
    template_dir = model_dir
    if adapter is not None:
        from slmops.adapters.core import resolve_ref

        adapter_dir = Path(resolve_ref(adapter, workspace)[0])
        if _chat_template(adapter_dir):  # a merged model takes the adapter's tokenizer when it has one
            template_dir = adapter_dir
    template = _chat_template(template_dir)
    if template is None:
        raise BadInputError(f"{template_dir} has no chat template, so no Foundry Local PromptTemplate can be derived",
                            "add a chat template to the tokenizer (slmops models create does)")
    bos, eos = _special_tokens(template_dir)
    inference_model_json(template, name=model_name, version=version, bos_token=bos, eos_token=eos,
                         system_prompt=system_prompt)
    written: dict[str, Any] = {}

    def add_inference_model(folder: Path, plan) -> None:
        genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
        t = _chat_template(folder) or template
        b, e = _special_tokens(folder)
        written.update(inference_model_json(t, name=model_name, version=version, bos_token=b, eos_token=e,
                                            system_prompt=system_prompt, genai_config=genai))
        (folder / INFERENCE_MODEL).write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    res = export_onnx(model, out, precision=precision, adapter=adapter, adapter_mode="merge",
                      int4_block_size=int4_block_size, int4_symmetric=int4_symmetric,
                      int4_accuracy_level=int4_accuracy_level, execution_provider=execution_provider, force=force,
                      workspace=workspace, name=name, eval_records=eval_records, eval_texts=eval_texts,
                      max_ppl_increase=max_ppl_increase, min_task_retention=min_task_retention, progress=progress,
                      _extra_files=add_inference_model)
    modelfile = None
    if gguf_path is not None:
        from slmops.export.gguf import write_modelfile

        modelfile = str(write_modelfile(gguf_path, Path(res.out_dir)))
    return FoundryResult(export=res, inference_model=written, modelfile=modelfile)


__all__ = ["INFERENCE_MODEL", "FoundryResult", "export_foundry", "inference_model_json"]

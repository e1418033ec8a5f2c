"""GGUF export for llama.cpp and Ollama: convert, quantize, carry adapters, write a Modelfile, measure parity.

``export_gguf(model, out_file, quant=...)``:

1. **checks, before any work**: the quantization name, the output path (an existing file is refused unless
   ``force``), the model folder (config.json, weights, tokenizer files), the adapter (it must fit the base:
   architecture, sizes, target modules), llama-cpp-python and llama.cpp's converter are installed, and a
   converter dry run on the model: llama.cpp must know the architecture and the tokenizer (see below);
2. **convert** the Hugging Face folder (or the merged model, ``adapter_mode="merge"``) to an f16 GGUF with
   llama.cpp's ``convert_hf_to_gguf.py``;
3. **quantize** with llama.cpp's quantizer (``llama_model_quantize``), optionally guided by an importance
   matrix computed on a calibration file (see ``slmops.export.llamacpp.compute_imatrix``);
4. with ``adapter_mode="lora"`` the base is exported as above and the adapter becomes a GGUF LoRA file
   (``convert_lora_to_gguf.py``) that llama.cpp and Ollama apply at load time;
5. an Ollama ``Modelfile`` (FROM, TEMPLATE in Go-template syntax derived from the chat template, SYSTEM for a
   template's default system prompt, PARAMETER stop) is written beside the GGUF;
6. **parity**: the source (torch) and the export (llama.cpp engine) are compared on the eval/calibration texts
   (``slmops.export.parity.measure_parity``): size vs fp16, perplexity and its change, KL divergence of the
   next-token distributions, top-1 agreement, the task metric. Quality gates (``max_ppl_increase``,
   ``min_task_retention``) fail the export with exit code 3, and then nothing is written;
7. files are written into a temporary folder beside the output and moved into place with one rename each,
   so an existing output is never half-overwritten and a failure leaves nothing behind; with a workspace the
   export is registered as an ``export`` artifact (parents: the model and adapter artifacts).

Tokenizers: llama.cpp's converter recognises a BPE tokenizer's pre-tokenizer by a hash of its tokens on a
probe text and refuses unknown hashes. Byte-level BPE tokenizers with GPT-2 splitting (optionally with single
digits split off first, as the tokenizers slmops trains, including the demo's) are mapped to llama.cpp's
``gpt-2`` pre-tokenizer; slmops then compares the two tokenizations on probe texts and reports the agreement
(``tokenizer_agreement``). Any other unknown tokenizer fails before work starts, naming the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError, SlmopsError

log = logging.getLogger(__name__)

ADAPTER_MODES = ("merge", "lora")
GPT2_FALLBACK = "gpt-2"
# texts whose tokenization by llama.cpp is compared with the source tokenizer's (plus the eval texts)
TOKENIZER_PROBES = (
    "Hello world! How are you today?",
    "Order #A-10234 for 3 items, shipped 08/24 to 221B Baker Street.",
    '{"intent": "refund", "order_id": "98765", "urgency": "high"}',
    "  two  spaces, a\ttab\nand a new line;   then 12345 678 and 3.14159",
    "Ünïcödé, emoji 🚀 and 中文 mixed with ASCII.",
    "I'm sure they'll say it's fine, won't they?",
)


@dataclass
class ExportResult:
    """What an export produced. `parity` is the ParityReport (None when not measured)."""

    format: str
    precision: str
    out: str
    bytes: int
    source: str
    source_fp16_bytes: int | None = None
    size_ratio_vs_fp16: float | None = None
    artifact_id: str | None = None
    adapter_file: str | None = None
    modelfile: str | None = None
    parity: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "parity"}
        d["parity"] = _report_dict(self.parity)
        return d


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if is_dataclass(report):
        return asdict(report)
    return dict(report)


# ------------------------------------------------------------------------------------------------ tokenizer


def gpt2_like_tokenizer(model_dir: Path) -> bool:
    """True for a byte-level BPE whose pre-tokenizer is GPT-2's regex split (ByteLevel with use_regex, no
    prefix space), optionally preceded by single-digit splitting: what llama.cpp's ``gpt-2`` pre-tokenizer
    reproduces (single digits come out the same because such a vocabulary has no multi-digit merges)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if (tj.get("model") or {}).get("type") != "BPE":
        return False
    pre = tj.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not items or items[-1].get("type") != "ByteLevel":
        return False
    last = items[-1]
    if not last.get("use_regex", True) or last.get("add_prefix_space", False):
        return False
    return all(p.get("type") == "Digits" and p.get("individual_digits") for p in items[:-1])


# ------------------------------------------------------------------------------------------------ Modelfile


@dataclass
class OllamaTemplate:
    template: str  # Go text/template for Ollama's TEMPLATE
    stop: list[str]
    system: str | None  # the chat template's default system prompt (Modelfile SYSTEM), if it has one


def _go_text(s: str) -> str:
    """Literal text inside a Go template ("{{" must not start an action)."""
    return s.replace("{{", '{{ "{{" }}')


def ollama_template(chat_template: str, *, bos_token: str = "", eos_token: str = "") -> OllamaTemplate:
    """An Ollama TEMPLATE (Go text/template) that renders chats as `chat_template` (Jinja) does.

    Derived from the per-role wrappers that ``slmops.models.templates`` slices out of the rendered template
    (so ChatML, Llama 3, Phi-3, Gemma, ... all work, and templates that are not per-role wrappers are
    refused with a clear error). `bos_token` is the text the template's ``bos_token`` stands for: pass ""
    when the runtime adds BOS itself (llama.cpp does when the GGUF says ``add_bos_token``)."""
    from slmops.models.templates import chat_template_to_prompt_template, prompt_template_roles

    tlog = logging.getLogger("slmops.models.templates")
    level = tlog.level
    tlog.setLevel(logging.ERROR)  # its warning about a dropped trailer concerns Foundry's PromptTemplate, not Ollama
    try:
        pt = chat_template_to_prompt_template(chat_template, bos_token=bos_token, eos_token=eos_token)
    finally:
        tlog.setLevel(level)
    roles = prompt_template_roles(pt)
    u_pre, u_post = roles.user
    a_pre, a_post = roles.assistant
    generation, system, prefix, default_system = roles.generation, roles.system, roles.prefix, roles.default_system
    g = _go_text
    parts = [g(prefix), "{{ if .Messages }}{{ range $i, $_ := .Messages }}",
             "{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    if system is not None:
        parts.append(f'{{{{ if eq .Role "system" }}}}{g(system[0])}{{{{ .Content }}}}{g(system[1])}{{{{ else if eq .Role "user" }}}}')
    else:
        parts.append('{{ if eq .Role "user" }}')
    parts.append(f"{g(u_pre)}{{{{ .Content }}}}{g(u_post)}{{{{ if $last }}}}{g(generation)}{{{{ end }}}}")
    parts.append(f'{{{{ else if eq .Role "assistant" }}}}{g(a_pre)}{{{{ .Content }}}}{{{{ if not $last }}}}{g(a_post)}{{{{ end }}}}')
    parts.append("{{ end }}{{ end }}{{ else }}")
    if system is not None:
        parts.append(f"{{{{ if .System }}}}{g(system[0])}{{{{ .System }}}}{g(system[1])}{{{{ end }}}}")
    parts.append(f"{{{{ if .Prompt }}}}{g(u_pre)}{{{{ .Prompt }}}}{g(u_post)}{{{{ end }}}}{g(generation)}"
                 f"{{{{ .Response }}}}{{{{ if .Response }}}}{g(a_post)}{{{{ end }}}}{{{{ end }}}}")
    stops: list[str] = []
    for cand in (a_post.strip(), eos_token, _leading_special(u_pre)):
        if cand and cand not in stops:
            stops.append(cand)
    return OllamaTemplate(template="".join(parts), stop=stops, system=default_system)


def _leading_special(text: str) -> str | None:
    m = re.match(r"\s*(<\|?[A-Za-z0-9_]+\|?>)", text)
    return m.group(1) if m else None


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(gguf_path: str | Path, tokenizer_or_chat_template: Any, out: str | Path | None = None, *,
                    from_path: str | None = None, adapter_path: str | None = None, bos_token: str | None = None,
                    eos_token: str | None = None, system: str | None = None,
                    parameters: dict[str, Any] | None = None) -> Path:
    """Write an Ollama Modelfile for `gguf_path` and return its path.

    `tokenizer_or_chat_template`: a Hugging Face tokenizer (its chat template and special tokens), a
    folder holding one, or a Jinja chat template string. `out`: default ``<gguf stem>.Modelfile`` beside the
    GGUF. `from_path` / `adapter_path`: what FROM / ADAPTER say (default: the file names, relative to the
    Modelfile). The TEMPLATE leaves BOS out when the GGUF has the runtime add it (``add_bos_token``).
    `system` overrides the template's default system prompt; `parameters` adds ``PARAMETER`` lines.
    The file is written atomically."""
    gguf_path = Path(gguf_path)
    template, tok_bos, tok_eos = _template_source(tokenizer_or_chat_template)
    bos = bos_token if bos_token is not None else tok_bos
    eos = eos_token if eos_token is not None else tok_eos
    if bos and gguf_path.is_file():
        try:
            from slmops.export.llamacpp import read_gguf_metadata

            if read_gguf_metadata(gguf_path, ("tokenizer.ggml.add_bos_token",)).get("tokenizer.ggml.add_bos_token"):
                bos = ""  # llama.cpp / Ollama add it when tokenizing
        except SlmopsError:
            pass
    ot = ollama_template(template, bos_token=bos or "", eos_token=eos or "")
    if '"""' in ot.template:
        raise BadInputError('the chat template contains """, which a Modelfile TEMPLATE cannot hold')
    out_p = Path(out) if out is not None else gguf_path.with_suffix(".Modelfile")
    frm = from_path or f"./{gguf_path.name}"
    lines = ["# Ollama Modelfile written by slmops: `ollama create NAME -f " + out_p.name + "`", f"FROM {frm}"]
    if adapter_path:
        lines.append(f"ADAPTER {adapter_path}")
    lines.append(f'TEMPLATE """{ot.template}"""')
    sys_prompt = system if system is not None else ot.system
    if sys_prompt:
        lines.append(f"SYSTEM {_quote(sys_prompt)}")
    for s in ot.stop:
        lines.append(f"PARAMETER stop {_quote(s)}")
    for k, v in (parameters or {}).items():
        lines.append(f"PARAMETER {k} {v}")
    text = "\n".join(lines) + "\n"
    tmp = out_p.with_name(f".{out_p.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_p)
    return out_p


def _template_source(obj: Any) -> tuple[str, str, str]:
    """(chat template, bos text, eos text) from a tokenizer, a tokenizer folder or a template string."""
    if isinstance(obj, Path) or (isinstance(obj, str) and "{%" not in obj and "{{" not in obj and Path(obj).exists()):
        from slmops.models.load import load_tokenizer

        obj = load_tokenizer(str(obj))
    if isinstance(obj, str):
        return obj, "", ""
    template = getattr(obj, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise BadInputError("the tokenizer has no chat template, so no Modelfile TEMPLATE can be derived",
                            "add a chat template to the tokenizer (slmops models create does)")
    return template, getattr(obj, "bos_token", None) or "", getattr(obj, "eos_token", None) or ""


# ------------------------------------------------------------------------------------------------ MLP padding

# architectures whose MLP is down(act(gate(x)) * up(x)) with separate, bias-free gate/up/down projections
PADDABLE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_MLP_WEIGHT = re.compile(r"(^|\.)layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
_LORA_MLP = re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight$")


def quant_block_size(quant: str) -> int:
    """Row-length multiple that llama.cpp's `quant` needs for every tensor to get that type (1 for floats)."""
    from slmops.export.llamacpp import FLOAT_TYPES, normalize_quant

    q = normalize_quant(quant)
    if q in FLOAT_TYPES:
        return 1
    if q in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"):
        return 32
    return 256  # k-quants and the other i-quants work on 256-value super-blocks


def mlp_padding(model_dir: Path, multiple: int) -> tuple[int, int] | None:
    """(intermediate_size, padded size) when the MLP width is not a multiple of `multiple` and the
    architecture allows exact zero-padding; else None."""
    if multiple <= 1:
        return None
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    size = cfg.get("intermediate_size")
    if cfg.get("model_type") not in PADDABLE_MODEL_TYPES or not isinstance(size, int) or size % multiple == 0:
        return None
    if cfg.get("mlp_bias") or any(k.startswith("text_config") for k in cfg):
        return None
    return size, -(-size // multiple) * multiple


def pad_mlp(model_dir: Path, dst: Path, new_size: int) -> Path:
    """A copy of the HF folder `model_dir` in `dst` whose MLP width is `new_size`: gate/up get zero rows and
    down zero columns, so every added unit computes act(0) * 0 = 0 and the model's outputs are unchanged
    (exactly), while llama.cpp can quantize ffn_down (its rows are now a multiple of the block size)."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    old = cfg["intermediate_size"]
    tensors: dict[str, Any] = {}
    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:
        raise BadInputError(f"{model_dir} has no .safetensors weights to pad")
    for f in weight_files:
        tensors.update(load_file(str(f)))
    padded = 0
    for key, t in list(tensors.items()):
        m = _MLP_WEIGHT.search(key)
        if not m:
            continue
        if m.group(4) == "bias":
            raise BadInputError(f"{key}: MLP biases are not padded")
        if m.group(3) in ("gate_proj", "up_proj") and t.shape[0] == old:
            tensors[key] = torch.cat([t, t.new_zeros((new_size - old, *t.shape[1:]))], dim=0)
        elif m.group(3) == "down_proj" and t.shape[-1] == old:
            tensors[key] = torch.cat([t, t.new_zeros((*t.shape[:-1], new_size - old))], dim=-1)
        else:
            raise BadInputError(f"{key} has shape {tuple(t.shape)}, not the intermediate size {old}")
        padded += 1
    if padded != 3 * int(cfg.get("num_hidden_layers", 0)):
        raise BadInputError(f"found {padded} MLP projections to pad, expected 3 per layer")
    dst.mkdir(parents=True, exist_ok=True)
    for p in model_dir.iterdir():
        if p.is_file() and p.suffix not in (".safetensors", ".bin") and p.name not in (
                "config.json", "model.safetensors.index.json", "slmops.json"):
            shutil.copy2(p, dst / p.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["intermediate_size"] = new_size
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def pad_lora(adapter_dir: Path, dst: Path, old: int, new_size: int) -> Path:
    """The adapter in `adapter_dir` made to fit a base whose MLP was padded by :func:`pad_mlp` (zero rows in
    gate/up lora_B, zero columns in down lora_A: the update to the added units is zero)."""
    import torch
    from safetensors.torch import load_file, save_file

    src = adapter_dir / "adapter_model.safetensors"
    if not src.is_file():
        raise BadInputError(f"{adapter_dir} has no adapter_model.safetensors to pad")
    tensors = load_file(str(src))
    for key, t in list(tensors.items()):
        m = _LORA_MLP.search(key)
        if not m:
            continue
        proj, ab = m.groups()
        if proj in ("gate_proj", "up_proj") and ab == "B" and t.shape[0] == old:
            tensors[key] = torch.cat([t, t.new_zeros((new_size - old, t.shape[1]))], dim=0)
        elif proj == "down_proj" and ab == "A" and t.shape[1] == old:
            tensors[key] = torch.cat([t, t.new_zeros((t.shape[0], new_size - old))], dim=1)
    dst.mkdir(parents=True, exist_ok=True)
    for p in adapter_dir.iterdir():
        if p.is_file() and p.name != "adapter_model.safetensors":
            shutil.copy2(p, dst / p.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------------ export


@dataclass
class _Plan:
    model_dir: Path
    model_artifact: str | None
    adapter_dir: Path | None
    adapter_artifact: str | None
    adapter_config: dict[str, Any] | None
    out: Path
    adapter_out: Path | None
    modelfile_out: Path | None
    quant: str
    pre_fallback: str | None
    pre_force: str | None


def _resolve_model(model: str | Path, workspace) -> tuple[Path, str | None]:
    from slmops.adapters.core import resolve_ref
    from slmops.models.load import check_model_folder, is_hub_id

    path_s, art = resolve_ref(model, workspace)
    p = Path(path_s)
    if not p.exists():
        if is_hub_id(str(model)):
            from slmops.models.load import _cached_snapshot

            snap = _cached_snapshot(str(model))
            if snap is None:
                raise NotFoundError(f"{model} is not a local model folder and is not in the local Hugging Face cache",
                                    "download it where the hub is reachable and pass the folder")
            p = snap
        else:
            raise NotFoundError(f"no model, artifact or folder {model!r}", "see `slmops models list`")
    if p.is_file():
        hint = "it is already a GGUF file" if p.suffix == ".gguf" else None
        raise BadInputError(f"expected a Hugging Face model folder, got a file: {p}", hint)
    if (p / "adapter_config.json").is_file():
        raise BadInputError(f"{p} is an adapter folder, not a model",
                            "pass the base model as --model and this folder as --adapter")
    check_model_folder(p, weights=True, tokenizer=True)
    return p.resolve(), art


def _plan(model, out_file, quant, adapter, adapter_mode, force, workspace, pre_tokenizer, modelfile) -> _Plan:
    from slmops.export.llamacpp import normalize_quant

    q = normalize_quant(quant)
    if adapter_mode not in ADAPTER_MODES:
        raise BadInputError(f"unknown adapter mode {adapter_mode!r}", f"use one of {', '.join(ADAPTER_MODES)}")
    out = Path(out_file).expanduser().resolve()
    if out.suffix.lower() != ".gguf":
        raise BadInputError(f"the output must be a .gguf file, got {out}", "pass e.g. --out model-q4_k_m.gguf")
    if out.is_dir():
        raise BadInputError(f"the output {out} is a folder", "pass a file path ending in .gguf")
    if not out.parent.is_dir():
        raise BadInputError(f"the output folder {out.parent} does not exist")
    model_dir, model_art = _resolve_model(model, workspace)
    adapter_dir = adapter_art = adapter_cfg = None
    if adapter is not None:
        from slmops.adapters.core import read_adapter, resolve_ref

        a_path, adapter_art = resolve_ref(adapter, workspace)
        info = read_adapter(a_path)
        adapter_dir, adapter_cfg = info.path, info.config
    adapter_out = out.with_name(f"{out.stem}.lora.gguf") if adapter is not None and adapter_mode == "lora" else None
    modelfile_out = out.with_suffix(".Modelfile") if modelfile else None
    existing = [p for p in (out, adapter_out, modelfile_out) if p is not None and p.exists()]
    if existing and not force:
        raise BadInputError(f"{', '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}",
                            "pass --force to replace (the old file stays intact until the new one is complete)")
    fallback = None if pre_tokenizer else (GPT2_FALLBACK if gpt2_like_tokenizer(model_dir) else None)
    return _Plan(model_dir, model_art, adapter_dir, adapter_art, adapter_cfg, out, adapter_out, modelfile_out, q,
                 fallback, pre_tokenizer)


def _check_adapter(plan: _Plan, workspace) -> None:
    """Refuse, before work, an adapter that does not fit the base (architecture, sizes, target modules) and,
    for lora mode, LoRA variants llama.cpp cannot apply."""
    from slmops.adapters.core import attach_adapter, read_adapter
    from slmops.models.load import load_model

    cfg = plan.adapter_config or {}
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise BadInputError(f"adapter {plan.adapter_dir} is a {peft_type} adapter; only LoRA adapters can be exported")
    model = load_model(str(plan.model_dir), dtype="float32")
    attach_adapter(model, read_adapter(plan.adapter_dir), "check", workspace=workspace)  # raises when it does not fit
    del model
    if plan.adapter_out is not None:
        unsupported = [k for k in ("use_dora",) if cfg.get(k)]
        unsupported += [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
        if unsupported:
            raise BadInputError(f"adapter {plan.adapter_dir} uses {', '.join(unsupported)}, which llama.cpp's LoRA "
                                "format cannot express", "export it merged (--adapter-mode merge)")


def export_gguf(
    model: str | Path,
    out_file: str | Path,
    *,
    quant: str = "q4_k_m",
    adapter: str | Path | None = None,
    adapter_mode: str = "merge",
    imatrix_file: str | Path | None = None,
    force: bool = False,
    workspace=None,
    name: str | None = None,
    eval_file: str | Path | None = None,
    texts: list[str] | None = None,
    measure: bool = True,
    max_ppl_increase: float | None = None,
    min_task_retention: float | None = None,
    max_new_tokens: int = 96,
    eval_limit: int | None = 100,
    modelfile: bool = True,
    pre_tokenizer: str | None = None,
    pad_ffn: bool = True,
    token_embedding_type: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a Hugging Face model (folder, artifact id or alias) to a GGUF file for llama.cpp / Ollama.

    `quant`: f32, f16, bf16 (straight from the converter) or a llama.cpp type: q8_0, q6_k, q5_k_m, q4_k_m,
    q4_0, ... (see ``slmops.export.llamacpp.quant_names()``). `adapter`: a PEFT LoRA folder or adapter
    artifact; `adapter_mode` "merge" bakes it into the weights, "lora" writes the base plus
    ``<out stem>.lora.gguf`` for llama.cpp (``--lora``) and Ollama (ADAPTER). `imatrix_file`: calibration
    text (plain text or a dataset file) for an importance matrix that guides quantization. `eval_file`: chat
    records with reference answers for parity (perplexity, KL, top-1 agreement and the task metric; at most
    `eval_limit` records are generated for the task metric); `texts`: plain texts for perplexity/KL instead.
    `max_ppl_increase` / `min_task_retention`: quality gates; failing one raises ``GateFailedError`` (exit 3)
    and writes nothing. `pre_tokenizer` forces llama.cpp's pre-tokenizer name. `pad_ffn`: when the MLP width
    is not a multiple of the quantization block (llama.cpp would keep those tensors in f16), zero-pad it
    first (exact: the outputs do not change). `token_embedding_type`: the token embeddings' type instead of
    the mix's (llama-quantize ``--token-embedding-type``, e.g. q4_k). `force` replaces existing outputs (atomically). With a
    `workspace` the export is registered as an ``export`` artifact (`name`, default the output file's stem).
    """
    from slmops.export.llamacpp import find_converter_dir, require_llama_cpp, run_converter_tool

    say = progress or (lambda msg: log.info("%s", msg))
    t_start = time.perf_counter()
    plan = _plan(model, out_file, quant, adapter, adapter_mode, force, workspace, pre_tokenizer, modelfile)
    require_llama_cpp()
    llama_dir = find_converter_dir()
    if imatrix_file is not None and not Path(imatrix_file).expanduser().is_file():
        raise BadInputError(f"calibration file not found: {imatrix_file}")
    if imatrix_file is not None and quant_block_size(plan.quant) == 1:
        raise BadInputError(f"an importance matrix guides quantization; {plan.quant} is not quantized",
                            "leave out --imatrix, or choose a quantized type such as q4_k_m")
    if token_embedding_type is not None:
        emb = token_embedding_type.lower()
        block = 256 if emb.endswith("_k") else 32 if emb.startswith("q") else 1
        hidden = json.loads((plan.model_dir / "config.json").read_text()).get("hidden_size")
        if isinstance(hidden, int) and hidden % block:
            raise BadInputError(f"token embeddings of width {hidden} cannot be stored as {emb} (its blocks are "
                                f"{block} wide)", "choose a type with 32-wide blocks (q4_0, q5_0, q8_0) or leave "
                                "--token-embedding-type out")
    if not measure and (max_ppl_increase is not None or min_task_retention is not None):
        raise BadInputError("quality gates need the parity measurement", "leave parity on to use gates")
    if min_task_retention is not None and eval_file is None:
        raise BadInputError("the task-retention gate needs evaluation records with answers",
                            "pass --eval-file with --min-task-retention")
    if max_ppl_increase is not None and eval_file is None and not texts:
        raise BadInputError("the perplexity gate needs evaluation texts", "pass --eval-file with --max-ppl-increase")
    if eval_file is not None and not Path(eval_file).expanduser().is_file():
        raise BadInputError(f"eval file not found: {eval_file}")
    if plan.adapter_dir is not None:
        say("checking the adapter against the base model")
        _check_adapter(plan, workspace)
    pre_args = (["--pre-tokenizer", plan.pre_force] if plan.pre_force else
                ["--pre-tokenizer-fallback", plan.pre_fallback] if plan.pre_fallback else [])
    say("checking the model with llama.cpp's converter")
    check = run_converter_tool([*pre_args, "check", "--model", str(plan.model_dir)], llama_dir)
    details: dict[str, Any] = {
        "architecture": check.get("architecture"), "pre_tokenizer": check.get("pre_tokenizer"),
        "pre_tokenizer_detected": check.get("pre_tokenizer_detected"), "converter": _converter_info(llama_dir),
    }
    work = plan.out.parent / f".{plan.out.name}.{uuid.uuid4().hex[:8]}.partial"
    work.mkdir()
    try:
        return _export(plan, work, llama_dir, details, workspace=workspace, name=name, imatrix_file=imatrix_file,
                       eval_file=eval_file, texts=texts, measure=measure, max_ppl_increase=max_ppl_increase,
                       min_task_retention=min_task_retention, max_new_tokens=max_new_tokens,
                       eval_limit=eval_limit, pre_args=pre_args, pad_ffn=pad_ffn, threads=threads, say=say,
                       token_embedding_type=token_embedding_type,
                       t_start=t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _converter_info(llama_dir: Path) -> dict[str, Any]:
    from slmops.export.llamacpp import converter_source

    return converter_source(llama_dir)


def _export(plan: _Plan, work: Path, llama_dir: Path, details: dict[str, Any], *, workspace, name, imatrix_file,
            eval_file, texts, measure, max_ppl_increase, min_task_retention, max_new_tokens, eval_limit,
            pre_args, pad_ffn, threads, say, t_start, token_embedding_type=None) -> ExportResult:
    from slmops.export.llamacpp import (
        FLOAT_TYPES,
        compute_imatrix,
        quantize,
        read_calibration_texts,
        run_converter_tool,
    )
    from slmops.models.load import load_tokenizer, model_info

    timings: dict[str, float] = {}
    src_dir = plan.model_dir
    if plan.adapter_dir is not None and plan.adapter_out is None:
        from slmops.adapters.merge import merge_adapter

        say("merging the adapter into the base model")
        t0 = time.perf_counter()
        merge_adapter(str(plan.model_dir), str(plan.adapter_dir), work / "merged", dtype="float32")
        src_dir = work / "merged"
        timings["merge_s"] = time.perf_counter() - t0
    tokenizer = load_tokenizer(str(src_dir))
    conv_dir = src_dir  # what the converter and the importance matrix read
    pad = mlp_padding(src_dir, quant_block_size(plan.quant)) if pad_ffn else None
    if pad is not None:
        say(f"padding the MLP width {pad[0]} -> {pad[1]} so that llama.cpp can quantize every layer (exact)")
        conv_dir = pad_mlp(src_dir, work / "padded", pad[1])
        details["ffn_padded"] = {"from": pad[0], "to": pad[1]}

    # convert
    t0 = time.perf_counter()
    float_out = plan.quant if plan.quant in FLOAT_TYPES else "f16"
    converted = work / f"model-{float_out}.gguf"
    say(f"converting to {float_out} GGUF (llama.cpp convert_hf_to_gguf.py)")
    run_converter_tool([*pre_args, "convert", "--model", str(conv_dir), "--outfile", str(converted),
                        "--outtype", float_out, "--model-name", plan.out.stem], llama_dir)
    timings["convert_s"] = time.perf_counter() - t0

    # quantize (with an importance matrix)
    final = converted
    if plan.quant not in FLOAT_TYPES:
        imatrix = None
        if imatrix_file is not None:
            say("computing the importance matrix on the calibration file")
            t0 = time.perf_counter()
            calib = read_calibration_texts(imatrix_file, tokenizer=tokenizer)
            imatrix, im_info = compute_imatrix(conv_dir, calib, converted)
            im_info["file"] = str(Path(imatrix_file).expanduser().resolve())
            details["imatrix"] = im_info
            timings["imatrix_s"] = time.perf_counter() - t0
        say(f"quantizing to {plan.quant} (llama.cpp llama_model_quantize)")
        final = work / f"model-{plan.quant}.gguf"
        rep = quantize(converted, final, plan.quant, imatrix=imatrix, threads=threads,
                       token_embedding_type=token_embedding_type)
        timings["quantize_s"] = rep.seconds
        details["quantize_fallbacks"] = rep.fallbacks
        if token_embedding_type:
            details["token_embedding_type"] = token_embedding_type
        converted.unlink()

    # adapter as a GGUF LoRA
    adapter_file = None
    if plan.adapter_out is not None:
        say("converting the adapter to a GGUF LoRA (llama.cpp convert_lora_to_gguf.py)")
        t0 = time.perf_counter()
        adapter_src = _lora_source(plan, work)
        if pad is not None:
            adapter_src = pad_lora(adapter_src, work / "adapter-padded", *pad)
        adapter_file = work / "adapter.lora.gguf"
        run_converter_tool(["convert-lora", "--adapter", str(adapter_src), "--base", str(conv_dir),
                            "--outfile", str(adapter_file), "--outtype", "f16"], llama_dir)
        timings["convert_lora_s"] = time.perf_counter() - t0

    # Modelfile (beside the output; the artifact gets its own with paths inside the artifact)
    modelfile_tmp = None
    if plan.modelfile_out is not None:
        try:
            modelfile_tmp = write_modelfile(final, tokenizer, work / plan.modelfile_out.name, from_path=f"./{plan.out.name}",
                                            adapter_path=f"./{plan.adapter_out.name}" if plan.adapter_out else None)
        except BadInputError as e:
            details["modelfile_error"] = e.message
            log.warning("no Modelfile: %s", e.message)

    size = final.stat().st_size + (adapter_file.stat().st_size if adapter_file else 0)
    info = model_info(str(plan.model_dir))
    fp16_bytes = int(info["params"]) * 2 if info.get("params") else None
    result = ExportResult(format="gguf", precision=plan.quant, out=str(plan.out), bytes=size,
                          source=str(plan.model_dir), source_fp16_bytes=fp16_bytes,
                          size_ratio_vs_fp16=round(size / fp16_bytes, 4) if fp16_bytes else None,
                          adapter_file=str(plan.adapter_out) if plan.adapter_out else None,
                          modelfile=str(plan.modelfile_out) if modelfile_tmp else None, details=details)

    # parity and gates (before anything is written where the user sees it)
    if measure:
        say("measuring parity against the source model")
        t0 = time.perf_counter()
        result.parity = _measure(plan, src_dir, final, adapter_file, tokenizer, details, eval_file=eval_file,
                                 texts=texts, candidate_bytes=size, fp16_bytes=fp16_bytes,
                                 max_new_tokens=max_new_tokens, eval_limit=eval_limit, threads=threads)
        timings["parity_s"] = time.perf_counter() - t0
        from slmops.export.parity import check_gates

        if max_ppl_increase is not None or min_task_retention is not None:
            check_gates(result.parity, max_ppl_increase=max_ppl_increase, min_task_retention=min_task_retention)
    details["timings"] = {k: round(v, 2) for k, v in timings.items()}
    details["seconds"] = round(time.perf_counter() - t_start, 2)

    # register, then move into place
    if workspace is not None:
        result.artifact_id = _register(workspace, plan, final, adapter_file, tokenizer, result, name)
    _place(final, plan.out)
    if adapter_file is not None:
        _place(adapter_file, plan.adapter_out)
    if modelfile_tmp is not None:
        _place(modelfile_tmp, plan.modelfile_out)
    return result


def _lora_source(plan: _Plan, work: Path) -> Path:
    """The adapter folder for convert_lora_to_gguf: as is, or a copy whose lora_alpha folds in rsLoRA's
    alpha/sqrt(r) scaling (llama.cpp scales by alpha/r)."""
    cfg = dict(plan.adapter_config or {})
    if not cfg.get("use_rslora"):
        return plan.adapter_dir
    r = float(cfg.get("r") or 8)
    cfg["lora_alpha"] = float(cfg.get("lora_alpha") or r) * r ** 0.5
    cfg["use_rslora"] = False
    dst = work / "adapter-src"
    dst.mkdir()
    for p in plan.adapter_dir.iterdir():
        if p.is_file() and p.name != "adapter_config.json":
            os.symlink(p, dst / p.name)
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _parity_records(eval_file, tokenizer, limit):
    from slmops.data import load_dataset_file

    ds = load_dataset_file(str(eval_file), purpose="prompts")
    records = [r for r in ds.records if r["messages"] and r["messages"][-1]["role"] == "assistant"]
    if not records:
        raise BadInputError(f"{eval_file} has no records with a reference answer (a final assistant turn)")
    return records[:limit] if limit else records


def _measure(plan: _Plan, src_dir: Path, final: Path, adapter_file: Path | None, tokenizer, details, *, eval_file,
             texts, candidate_bytes, fp16_bytes, max_new_tokens, eval_limit, threads):
    from slmops.engines.llamacpp_engine import LlamaCppEngine
    from slmops.engines.torch_engine import TorchEngine
    from slmops.export.parity import measure_parity

    records = _parity_records(eval_file, tokenizer, eval_limit) if eval_file is not None else None
    if plan.adapter_out is not None:
        source = TorchEngine(str(plan.model_dir), adapters={"adapter": str(plan.adapter_dir)}, default_adapter="adapter",
                             threads=threads)
        candidate = LlamaCppEngine(final, tokenizer=tokenizer, adapters={"adapter": adapter_file},
                                   default_adapter="adapter", threads=threads)
    else:
        source = TorchEngine(str(src_dir), threads=threads)
        candidate = LlamaCppEngine(final, tokenizer=tokenizer, threads=threads)
    try:
        from slmops.export.parity import texts_from_records

        if texts is None and records:
            texts = texts_from_records(records, source)
            details["parity_texts"] = f"the {len(texts)} eval records, rendered with the chat template"
        elif texts is None:
            texts = list(TOKENIZER_PROBES)
            details["parity_texts"] = "built-in probe texts (pass an eval file for perplexity on your data)"
        probe = list(dict.fromkeys([*TOKENIZER_PROBES, *texts]))
        details["tokenizer_agreement"] = tokenizer_agreement(source, candidate, probe)
        return measure_parity(source, candidate, texts=texts, records=records, candidate_bytes=candidate_bytes,
                              source_fp16_bytes=fp16_bytes, max_new_tokens=max_new_tokens)
    finally:
        candidate.close()
        source.close()


def tokenizer_agreement(source, candidate, texts: list[str]) -> dict[str, Any]:
    """How many `texts` the two engines tokenize identically (the first difference is shown)."""
    same = 0
    first = None
    for t in texts:
        a, b = source.tokenize(t), candidate.tokenize(t)
        if a == b:
            same += 1
        elif first is None:
            first = {"text": t[:120], "source": a[:40], "gguf": b[:40]}
    out: dict[str, Any] = {"texts": len(texts), "identical": same, "rate": round(same / len(texts), 4) if texts else None}
    if first is not None:
        out["first_difference"] = first
        log.warning("llama.cpp tokenizes %d of %d probe texts differently from the source tokenizer (e.g. %r)",
                    len(texts) - same, len(texts), first["text"])
    return out


def _register(workspace, plan: _Plan, final: Path, adapter_file: Path | None, tokenizer, result: ExportResult,
              name: str | None) -> str:
    config = {
        "format": "gguf", "quant": plan.quant, "source": str(plan.model_dir),
        "adapter": str(plan.adapter_dir) if plan.adapter_dir else None,
        "adapter_mode": ("lora" if plan.adapter_out else "merge") if plan.adapter_dir else None,
        "pre_tokenizer": result.details.get("pre_tokenizer"),
        "pre_tokenizer_detected": result.details.get("pre_tokenizer_detected"),
        "imatrix": result.details.get("imatrix"), "converter": result.details.get("converter"),
        "out": result.out,
    }
    metrics: dict[str, Any] = {"bytes": result.bytes, "source_fp16_bytes": result.source_fp16_bytes,
                               "size_ratio_vs_fp16": result.size_ratio_vs_fp16}
    parity = _report_dict(result.parity)
    if parity:
        metrics["parity"] = parity
    if "tokenizer_agreement" in result.details:
        metrics["tokenizer_agreement"] = result.details["tokenizer_agreement"]
    if result.details.get("quantize_fallbacks"):
        metrics["quantize_fallbacks"] = len(result.details["quantize_fallbacks"])
    parents = [a for a in (plan.model_artifact, plan.adapter_artifact) if a]
    with workspace.create_artifact("export", name or plan.out.stem, config=config, parents=parents,
                                   metrics=metrics) as w:
        _link_or_copy(final, w.path / "model.gguf")
        if adapter_file is not None:
            _link_or_copy(adapter_file, w.path / "adapter.lora.gguf")
        try:
            write_modelfile(w.path / "model.gguf", tokenizer, w.path / "Modelfile", from_path="./model.gguf",
                            adapter_path="./adapter.lora.gguf" if adapter_file is not None else None)
        except BadInputError:
            pass
        return w.id


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _place(src: Path, dst: Path) -> None:
    """Move `src` to `dst` in one rename (replacing `dst` atomically when it exists)."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


__all__ = ["ADAPTER_MODES", "ExportResult", "OllamaTemplate", "export_gguf", "gpt2_like_tokenizer",
           "ollama_template", "tokenizer_agreement", "write_modelfile"]

"""Export a Hugging Face model (and LoRA adapters) to ONNX for ONNX Runtime GenAI, with onnxruntime-genai's
own model builder (``python -m onnxruntime_genai.models.builder``), offline, from a local folder.

    result = export_onnx("runs/student", "exports/student-int4", precision="int4", workspace=ws)
    result = export_onnx("demo-teacher", "exports/t", adapter="runs/lora", adapter_mode="runtime")

The output folder is what onnxruntime-genai loads (``og.Model(folder)``) and what the ``ort-genai`` engine
opens: ``model.onnx`` + ``model.onnx.data``, ``genai_config.json``, the tokenizer files (``tokenizer.json``,
``tokenizer_config.json`` with the chat template inside as well, ``chat_template.jinja``) and
``export.json`` (how it was made, which adapters it has, the parity measured).

Adapters (LoRA), two ways:

- ``adapter_mode="merge"``: the adapter is merged into the base weights (PEFT ``merge_and_unload``) before
  the export; the result is a plain model.
- ``adapter_mode="runtime"``: the base is exported once with a LoRA branch (``x A B``) beside each adapted
  projection, whose A and B matrices are graph inputs with a default of zero (so with no adapter active the
  model is exactly the base), and each adapter becomes an ONNX Runtime ``.onnx_adapter`` file in
  ``adapters/`` that ``og.Adapters`` loads and ``set_active_adapter`` switches per generator. The rank is a
  free dimension, so adapters of any rank fit; the adapted projections are the union of the given
  adapters' targets. :func:`export_onnx_adapter` adds another adapter to such an export later and refuses
  one that targets a projection the export has no branch for, or whose shapes differ.

Everything is checked before any work starts (architecture supported by the builder, tokenizer present,
each adapter's rank, shapes and target modules against the base's config.json, precision and execution
provider valid together); all problems are reported at once. The export is built in a temporary folder
beside `out_dir` and renamed into place only when complete: an existing non-empty `out_dir` is refused
unless `force`, and is replaced only at that final rename, so a failure never leaves a half-written or
half-overwritten folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from slmops.errors import BadInputError, NotFoundError, SlmopsError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "int4")
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml")
ADAPTER_MODES = ("merge", "runtime")
# what the builder can produce and onnxruntime-genai can run (fp16 on CPU builds a graph the CPU provider
# cannot run: it fails at the first decode step)
VALID_COMBINATIONS = {
    "cpu": ("fp32", "int8", "int4"),
    "cuda": ("fp32", "fp16", "int8", "int4"),
    "dml": ("fp16", "int4"),
}
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
EXPORT_INFO = "export.json"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
MODEL_FILES = ("model.onnx", "model.onnx.data")
# architectures onnxruntime-genai 0.18's builder dispatches on (used when its source cannot be read)
_FALLBACK_ARCHITECTURES = (
    "ChatGLMForConditionalGeneration", "ChatGLMModel", "Ernie4_5ForCausalLM", "GemmaForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "GptOssForCausalLM",
    "GraniteForCausalLM", "InternLM2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
    "NemotronForCausalLM", "OlmoForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Phi3SmallForCausalLM",
    "Phi3VForCausalLM", "Phi4MMForCausalLM", "PhiMoEForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# architectures whose projections are named as above and whose LoRA branches the builder names
# /model/layers.N/{attn|mlp}/<proj>/lora_{A|B}/MatMul (checked after every runtime-mode build)
RUNTIME_ADAPTER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                 "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM",
                                 "SmolLM3ForCausalLM")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.*?layers\.(?P<layer>\d+)\.(?P<group>[A-Za-z_]+)\."
                       r"(?P<proj>[A-Za-z0-9_]+))\.lora_(?P<ab>[AB])\.weight$")
_LORA_SLOT = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<group>attn|mlp)\.(?P<proj>\w+)\.lora_(?P<ab>[AB])"
                        r"\.MatMul\.weight$")


# ------------------------------------------------------------------------------------------------ results


@dataclass
class ExportResult:
    """What an export wrote and measured (``to_dict()`` is JSON-serialisable)."""

    out_dir: str
    format: str
    precision: str
    execution_provider: str | None = None
    adapter_mode: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter file (runtime) / source (merge)
    default_adapter: str | None = None
    parameters: int | None = None
    size_bytes: int = 0  # the model files (adapter files not included)
    source_fp16_bytes: int | None = None
    size_ratio_vs_fp16: float | None = None
    artifact_id: str | None = None
    parity: Any = None  # ParityReport, when evaluation data was given
    wall_s: float = 0.0
    source: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["parity"] = self.parity.to_dict() if self.parity is not None else None
        return d


# ------------------------------------------------------------------------------------------ what is supported


def supported_architectures() -> list[str]:
    """Model architectures (config.json ``architectures[0]``) that the installed onnxruntime-genai builder
    exports, read from its source (the builder dispatches on exactly these names)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("onnxruntime_genai")
        if spec is not None and spec.submodule_search_locations:
            src = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
            found = sorted(set(re.findall(r'architectures\[0\]\s*==\s*"(\w+)"', src.read_text(encoding="utf-8"))))
            if found:
                return found
    except (OSError, ImportError, ValueError):
        pass
    return sorted(_FALLBACK_ARCHITECTURES)


def _require_packages() -> None:
    import importlib.util

    missing = [p for p, mod in (("onnxruntime-genai", "onnxruntime_genai"), ("onnxruntime", "onnxruntime"),
                                ("onnx", "onnx"), ("onnx-ir", "onnx_ir")) if importlib.util.find_spec(mod) is None]
    if missing:
        raise BadInputError(f"ONNX export needs {', '.join(missing)}, which is not installed",
                            "pip install 'slmops[export]' (or: pip install onnx onnx-ir onnxruntime onnxruntime-genai)")


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each attention/MLP projection of a decoder from its config.json; {}
    when the config does not say (the shapes cannot be checked then)."""
    cfg = config.get("text_config") or config
    try:
        h = int(cfg["hidden_size"])
        nh = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or nh)
        hd = int(cfg.get("head_dim") or h // nh)
        inter = int(cfg["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return {}
    return {"q_proj": (h, nh * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (nh * hd, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


# ---------------------------------------------------------------------------------------------- adapters


@dataclass
class _Adapter:
    name: str
    info: Any  # AdapterInfo
    artifact_id: str | None
    modules: dict[tuple[int, str], dict[str, Any]]  # (layer, proj) -> {"path", "A": shape, "B": shape}


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from slmops.models.load import _safetensors_header

        return {k: tuple(v["shape"]) for k, v in _safetensors_header(st).items()}
    import torch

    return {k: tuple(v.shape) for k, v in torch.load(folder / "adapter_model.bin", map_location="cpu",
                                                     weights_only=True).items()}


def _pattern_value(patterns: dict | None, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _target_names(targets) -> list[str] | None:
    if targets is None or isinstance(targets, str):  # a regex or "all-linear": checked through the weights
        return None
    return sorted({str(t).rsplit(".", 1)[-1] for t in targets})


def inspect_adapter(info, base_config: dict[str, Any], *, runtime: bool, name: str = "") -> tuple[dict, list[str]]:
    """Compare an adapter folder with the base's config.json without loading any weights: returns the
    adapted modules ``{(layer, proj): {"path", "A": shape, "B": shape}}`` and every problem found (rank,
    shapes, target modules, layers; for `runtime`, the LoRA features a runtime adapter cannot carry)."""
    cfg = info.config
    label = f"adapter {name or info.path}"
    problems: list[str] = []
    if info.peft_type != "LORA":
        return {}, [f"{label} is a {info.peft_type} adapter: only LoRA adapters can be exported"]
    shapes = linear_shapes(base_config)
    n_layers = (base_config.get("text_config") or base_config).get("num_hidden_layers")
    model_type = base_config.get("model_type", "?")
    try:
        weights = _adapter_shapes(info.path)
    except Exception as e:  # noqa: BLE001 - an unreadable weights file is the user's input problem
        return {}, [f"{label}: cannot read its weights: {e}"]
    modules: dict[tuple[int, str], dict[str, Any]] = {}
    other: list[str] = []
    for key, shape in weights.items():
        m = _LORA_KEY.match(key)
        if m is None:
            other.append(key)
            continue
        entry = modules.setdefault((int(m["layer"]), m["proj"]), {"path": m["path"]})
        entry[m["ab"]] = shape
    targets = _target_names(cfg.get("target_modules"))
    if targets is not None and shapes:
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            problems.append(f"{label} targets modules a {model_type} base does not have: {', '.join(unknown)} "
                            f"(its adapted projections can be: {', '.join(shapes)})")
    present = sorted({proj for _, proj in modules})
    if targets is not None:
        extra = [p for p in present if p not in targets]
        if extra:
            problems.append(f"{label} has weights for {', '.join(extra)}, which adapter_config.json target_modules "
                            f"({', '.join(targets)}) does not name")
    r_default = cfg.get("r")
    for (layer, proj), entry in sorted(modules.items()):
        where = f"{label}, layer {layer} {proj}"
        if n_layers is not None and layer >= int(n_layers):
            problems.append(f"{where}: the base has only {n_layers} layers")
            continue
        a, b = entry.get("A"), entry.get("B")
        if a is None or b is None:
            problems.append(f"{where}: lora_{'A' if a is None else 'B'} weight is missing")
            continue
        if len(a) != 2 or len(b) != 2:
            problems.append(f"{where}: LoRA weights are not matrices ({a}, {b})")
            continue
        if a[0] != b[1]:
            problems.append(f"{where}: rank of lora_A ({a[0]}) differs from rank of lora_B ({b[1]})")
        want_r = _pattern_value(cfg.get("rank_pattern"), entry["path"], r_default)
        if want_r is not None and a[0] != int(want_r):
            problems.append(f"{where}: rank {a[0]} in the weights, but adapter_config.json says r={want_r}")
        if proj in shapes:
            fin, fout = shapes[proj]
            if a[1] != fin or b[0] != fout:
                problems.append(f"{where}: the adapter maps {a[1]} -> {b[0]} features, the base's {proj} maps "
                                f"{fin} -> {fout} (hidden/intermediate size or head count differ)")
        elif shapes and not runtime:
            problems.append(f"{where}: the base has no {proj} projection")
    if not modules:
        problems.append(f"{label} has no LoRA weights for decoder layers (keys like ...layers.0.self_attn.q_proj.lora_A.weight)")
    if runtime:
        unsupported = []
        if cfg.get("use_dora"):
            unsupported.append("DoRA (use_dora)")
        if cfg.get("lora_bias") or cfg.get("bias") not in (None, "none"):
            unsupported.append("bias terms")
        if cfg.get("modules_to_save"):
            unsupported.append(f"fully trained modules (modules_to_save: {cfg.get('modules_to_save')})")
        if cfg.get("trainable_token_indices"):
            unsupported.append("trainable token embeddings")
        if other and not unsupported:
            unsupported.append(f"weights outside LoRA projections (e.g. {other[0]})")
        odd = sorted({proj for _, proj in modules if proj not in ATTENTION_PROJECTIONS + MLP_PROJECTIONS})
        if odd:
            unsupported.append(f"projections other than {', '.join(ATTENTION_PROJECTIONS + MLP_PROJECTIONS)} ({', '.join(odd)})")
        if unsupported:
            problems.append(f"{label} uses {', '.join(unsupported)}, which a runtime adapter cannot carry; "
                            "export it with adapter_mode='merge' (--adapter-mode merge)")
    return modules, problems


def lora_parameters(info, slots: dict[str, dict[str, Any]], *, name: str = "") -> dict[str, Any]:
    """The ``.onnx_adapter`` parameters of a LoRA adapter for an export with LoRA `slots` (graph input name
    -> {"rows", "cols", "ab", "dtype"}): A transposed, and B transposed and multiplied by the LoRA scaling
    (alpha / r, or alpha / sqrt(r) for rsLoRA), so that ``x @ A @ B`` is PEFT's update. Projections the
    adapter does not adapt get a zero branch. Raises ``BadInputError`` when the adapter has a projection the
    export has no slot for, or a shape that does not fit the slot."""
    import numpy as np
    import torch
    from safetensors import safe_open

    cfg = info.config
    label = f"adapter {name or info.path}"
    st = info.path / "adapter_model.safetensors"
    if st.is_file():
        with safe_open(str(st), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors = torch.load(info.path / "adapter_model.bin", map_location="cpu", weights_only=True)
    pairs: dict[tuple[int, str], dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m is not None:
            pairs.setdefault((int(m["layer"]), m["proj"]), {"path": m["path"]})[m["ab"]] = value
    params: dict[str, Any] = {}
    problems = []
    for (layer, proj), entry in sorted(pairs.items()):
        group = "attn" if proj in ATTENTION_PROJECTIONS else "mlp"
        a_name = f"model.layers.{layer}.{group}.{proj}.lora_A.MatMul.weight"
        b_name = f"model.layers.{layer}.{group}.{proj}.lora_B.MatMul.weight"
        if a_name not in slots or b_name not in slots:
            problems.append(f"layer {layer} {proj}")
            continue
        a = entry["A"].float()  # [r, in]
        b = entry["B"].float()  # [out, r]
        r = a.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern"), entry["path"], cfg.get("lora_alpha", r))
        scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
        sa, sb = slots[a_name], slots[b_name]
        if a.shape[1] != sa["rows"] or b.shape[0] != sb["cols"]:
            raise BadInputError(
                f"{label} does not fit this export: layer {layer} {proj} maps {a.shape[1]} -> {b.shape[0]} "
                f"features, the exported model's maps {sa['rows']} -> {sb['cols']}",
                "export adapters onto the base they were trained on")
        params[a_name] = a.T.contiguous().numpy().astype(sa["dtype"])
        params[b_name] = (b * scale).T.contiguous().numpy().astype(sb["dtype"])
    if problems:
        raise BadInputError(
            f"{label} does not fit this export: it adapts {', '.join(problems[:6])}"
            f"{' ...' if len(problems) > 6 else ''}, which the export has no LoRA branch for "
            f"(the export adapts: {_describe_slots(slots)})",
            "export the base again with this adapter among --adapter (the branches are the union of the "
            "adapters' targets), or merge it (--adapter-mode merge)")
    for slot, s in slots.items():
        if slot not in params:
            shape = (s["rows"], 1) if s["ab"] == "A" else (1, s["cols"])
            params[slot] = np.zeros(shape, dtype=s["dtype"])
    return params


def _describe_slots(slots: dict[str, dict[str, Any]]) -> str:
    projs = sorted({m["proj"] for m in (_LORA_SLOT.match(s) for s in slots) if m})
    return ", ".join(projs) or "nothing"


def write_adapter_file(params: dict[str, Any], path: Path) -> None:
    """Write LoRA parameters as an ONNX Runtime adapter file (``.onnx_adapter``)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(path))


def read_lora_slots(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The LoRA inputs of an exported ``model.onnx`` (name -> rows, cols, ab, dtype); {} for an export made
    without runtime adapters. Reads the graph only, not the weights."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    slots = {}
    for inp in model.graph.input:
        m = _LORA_SLOT.match(inp.name)
        if m is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        slots[inp.name] = {"rows": dims[0], "cols": dims[1], "ab": m["ab"], "dtype": str(dtype)}
    return slots


def _make_lora_inputs(src_dir: Path, dst_dir: Path) -> dict[str, dict[str, Any]]:
    """Copy the export in `src_dir` to `dst_dir` with every LoRA weight turned into a graph input (rank a
    free dimension) whose default, an initializer of the same name, is a rank-1 zero matrix. Returns the
    slots (see :func:`read_lora_slots`)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src_dir / "model.onnx"))  # with its external data
    slots: dict[str, dict[str, Any]] = {}
    kept = []
    quantized = []
    for init in model.graph.initializer:
        if ".lora_A." in init.name or ".lora_B." in init.name:
            m = _LORA_SLOT.match(init.name)
            if m is None:
                quantized.append(init.name)
                kept.append(init)
                continue
            arr = numpy_helper.to_array(init)
            rows, cols = arr.shape
            ab = m["ab"]
            dims = [rows, f"lora_rank_{len(slots)}"] if ab == "A" else [f"lora_rank_{len(slots)}", cols]
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, dims))
            zero = np.zeros((rows, 1) if ab == "A" else (1, cols), dtype=arr.dtype)
            kept.append(numpy_helper.from_array(zero, init.name))
            slots[init.name] = {"rows": rows if ab == "A" else None, "cols": cols if ab == "B" else None, "ab": ab,
                                "dtype": str(arr.dtype)}
        else:
            kept.append(init)
    if quantized:
        raise SlmopsError(f"the builder quantized the LoRA branches ({quantized[0]} ...), so they cannot be "
                          "swapped at run time", "export with adapter_mode='merge'")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in src_dir.iterdir():
        if p.is_file() and p.name not in MODEL_FILES:
            shutil.copy2(p, dst_dir / p.name)
    onnx.save_model(model, str(dst_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return slots


def _zero_lora(src: Path, out: Path, modules: set[tuple[int, str]], shapes: dict[str, tuple[int, int]],
               base_dir: Path, rank: int) -> Path:
    """A PEFT adapter folder with zero LoRA weights on `modules`, for the builder to lay out the LoRA
    branches (their values are replaced by graph inputs afterwards)."""
    import torch
    from safetensors.torch import save_file

    from slmops.models.load import _safetensors_header, _weight_files

    paths: dict[tuple[int, str], str] = {}
    for f in _weight_files(base_dir):
        if f.suffix != ".safetensors":
            continue
        for key in _safetensors_header(f):
            m = re.match(r"^(?P<path>.*layers\.(?P<layer>\d+)\.[A-Za-z_]+\.(?P<proj>\w+))\.weight$", key)
            if m and (int(m["layer"]), m["proj"]) in modules:
                paths[(int(m["layer"]), m["proj"])] = m["path"]
    missing = sorted(modules - set(paths))
    if missing:
        raise BadInputError(f"cannot find the base's weights for {missing[:3]} in {base_dir} (safetensors needed "
                            "for runtime adapters)", "export with adapter_mode='merge'")
    tensors = {}
    for (_layer, proj), path in paths.items():
        fin, fout = shapes[proj]
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.zeros((rank, fin))
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.zeros((fout, rank))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": sorted({p for _, p in modules}), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": str(src)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


# ---------------------------------------------------------------------------------------------- the builder


def run_builder(src: Path, out: Path, *, precision: str, execution_provider: str, cache_dir: Path,
                extra_options: dict[str, Any], log_path: Path) -> None:
    """Run onnxruntime-genai's model builder in a subprocess (offline; its output goes to `log_path`).
    Raises ``SlmopsError`` with the end of the log when it fails."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", execution_provider, "-c", str(cache_dir)]
    if extra_options:
        cmd += ["--extra_options", *[f"{k}={v}" for k, v in extra_options.items()]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    log.debug("running %s", " ".join(cmd))
    with log_path.open("w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(cache_dir.parent))
    if proc.returncode != 0:
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("Saving ")]
        raise SlmopsError("onnxruntime-genai's model builder failed (exit code "
                          f"{proc.returncode}):\n  " + "\n  ".join(lines[-12:]),
                          "run with --verbose for the whole log; check that the model loads with transformers")


# --------------------------------------------------------------------------------------------- the export


@dataclass
class _Plan:
    model_dir: Path
    model_art: str | None
    config: dict[str, Any]
    out: Path
    adapters: list[_Adapter]
    parameters: int | None
    notes: list[str]


def _resolve_model(model: str | Path, workspace) -> tuple[Path, str | None]:
    from slmops.adapters.core import is_adapter_folder, resolve_ref
    from slmops.models.load import _resolve, is_hub_id

    path, art = resolve_ref(model, workspace)
    p = Path(path)
    if not p.exists():
        if is_hub_id(str(model)):
            local = _resolve(str(model))  # the local Hugging Face cache, or a clear offline error
            if not isinstance(local, Path):
                raise BadInputError(f"{model} is not in the local Hugging Face cache; the exporter needs a local folder",
                                    f"download it first (hf download {model} --local-dir DIR) and pass DIR")
            p = local
        else:
            raise NotFoundError(f"no model, artifact or alias {str(model)!r}", "see `slmops models list`")
    if is_adapter_folder(p):
        raise BadInputError(f"{model} is an adapter, not a model",
                            "pass its base model as --model and this folder as --adapter")
    return p, art


def _adapter_list(adapter) -> list[tuple[str | None, str]]:
    if adapter is None:
        return []
    if isinstance(adapter, dict):
        return [(str(k), str(v)) for k, v in adapter.items()]
    if isinstance(adapter, str | Path):
        return [(None, str(adapter))]
    out = []
    for a in adapter:
        if isinstance(a, tuple):
            out.append((a[0], str(a[1])))
        else:
            s = str(a)
            name, sep, ref = s.partition("=")
            out.append((name, ref) if sep and name and "/" not in name else (None, s))
    return out


def _adapter_default_name(info, art: str | None, workspace) -> str:
    from slmops.engines import _adapter_name

    if art is not None and workspace is not None:
        row = workspace.registry.get(art)
        if row is not None:
            return _adapter_name(SimpleNamespace(manifest={"name": row["name"]}, path=info.path))
    return _adapter_name(info)


def plan_export(model, out_dir, *, precision: str = "int4", adapter=None, adapter_mode: str = "merge",
                int4_block_size: int = 32, int4_accuracy_level: int = 4, execution_provider: str = "cpu",
                force: bool = False, workspace=None, require_chat_template: bool = False) -> _Plan:
    """Check everything an export needs before any work (see :func:`export_onnx`); one ``BadInputError``
    lists every problem."""
    from slmops.adapters.core import check_adapter_name, check_base_config, read_adapter, resolve_ref
    from slmops.models.load import TOKENIZER_FILES, _weight_files

    problems: list[str] = []
    if precision not in PRECISIONS:
        problems.append(f"unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})")
    if execution_provider not in EXECUTION_PROVIDERS:
        problems.append(f"unknown execution provider {execution_provider!r} (choose one of {', '.join(EXECUTION_PROVIDERS)})")
    elif precision in PRECISIONS and precision not in VALID_COMBINATIONS[execution_provider]:
        problems.append(f"precision {precision} is not available for the {execution_provider} execution provider "
                        f"(it supports {', '.join(VALID_COMBINATIONS[execution_provider])})")
    if int4_block_size not in INT4_BLOCK_SIZES:
        problems.append(f"int4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, got {int4_block_size}")
    if int4_accuracy_level not in ACCURACY_LEVELS:
        problems.append(f"int4 accuracy level must be one of 0-4, got {int4_accuracy_level}")
    if adapter_mode not in ADAPTER_MODES:
        problems.append(f"unknown adapter mode {adapter_mode!r} (choose merge or runtime)")
    refs = _adapter_list(adapter)
    if adapter_mode == "merge" and len(refs) > 1:
        problems.append("only one adapter can be merged into an export (use adapter_mode='runtime' for several)")

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"output {out} exists and is not empty (pass --force to replace it; it is replaced only "
                        "once the new export is complete)")

    model_dir, model_art = _resolve_model(model, workspace)
    config: dict[str, Any] = {}
    if out == model_dir.resolve() or model_dir.resolve() in out.parents:
        problems.append(f"output {out} is inside the model folder {model_dir}")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        problems.append(f"{model_dir} has no config.json: not a Hugging Face model folder")
    else:
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"cannot read {cfg_path}: {e}")
    if not _weight_files(model_dir):
        problems.append(f"{model_dir} has no weights (model.safetensors)")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    supported = supported_architectures()
    if config and arch not in supported:
        problems.append(f"architecture {arch or config.get('model_type', '?')!r} is not supported by onnxruntime-genai's "
                        f"model builder (supported: {', '.join(supported)})")

    adapters: list[_Adapter] = []
    names: set[str] = set()
    for name, ref in refs:
        try:
            apath, aart = resolve_ref(ref, workspace)
            info = read_adapter(apath)
        except SlmopsError as e:
            problems.append(str(e.message))
            continue
        name = name or _adapter_default_name(info, aart, workspace)
        try:
            check_adapter_name(name)
        except BadInputError as e:
            problems.append(e.message)
        if name in names:
            problems.append(f"adapter name {name!r} is given twice")
        names.add(name)
        modules, issues = inspect_adapter(info, config, runtime=adapter_mode == "runtime", name=name)
        problems += issues
        try:
            check_base_config(info, SimpleNamespace(**config), workspace)
        except BadInputError as e:
            problems.append(e.message)
        adapters.append(_Adapter(name=name, info=info, artifact_id=aart, modules=modules))
    if adapter_mode == "runtime":
        if not refs:
            problems.append("adapter_mode='runtime' needs at least one adapter")
        elif arch is not None and arch not in RUNTIME_ADAPTER_ARCHITECTURES:
            problems.append(f"runtime adapters are supported for {', '.join(RUNTIME_ADAPTER_ARCHITECTURES)}, not {arch}; "
                            "merge the adapter instead (adapter_mode='merge')")

    tok_dirs = [model_dir] + ([a.info.path for a in adapters] if adapter_mode == "merge" else [])
    if not any((d / f).is_file() for d in tok_dirs for f in TOKENIZER_FILES):
        problems.append(f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): onnxruntime-genai needs the "
                        "tokenizer beside the model; save it with tokenizer.save_pretrained(MODEL_DIR)")
    notes = []
    template = _chat_template(model_dir)
    if template is None:
        msg = (f"{model_dir} has no chat template (chat_template.jinja or tokenizer_config.json chat_template), so "
               "chat messages cannot be rendered for it")
        if require_chat_template:
            problems.append(msg)
        else:
            notes.append(msg)
    if problems:
        raise BadInputError("cannot export: " + ("\n  - " + "\n  - ".join(problems) if len(problems) > 1 else problems[0]))
    params = None
    try:
        from slmops.models.load import _params_from_safetensors

        st = [p for p in _weight_files(model_dir) if p.suffix == ".safetensors"]
        params = _params_from_safetensors(st)[0] if st else None
    except SlmopsError:
        params = None
    return _Plan(model_dir=model_dir, model_art=model_art, config=config, out=out, adapters=adapters,
                 parameters=params, notes=notes)


def _chat_template(folder: Path) -> str | None:
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(t, list):  # named templates
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) and t else None
    return None


def _finish_tokenizer_files(src: Path, out: Path) -> None:
    """Make sure the export has the tokenizer and its chat template in both places readers look for it."""
    from slmops.models.load import TOKENIZER_FILES

    for name in (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if not (out / name).exists() and (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").is_file():
        raise SlmopsError(f"the export in {out} has no tokenizer.json", "the source tokenizer must be a fast "
                          "(tokenizer.json) or sentencepiece tokenizer")
    template = _chat_template(src) or _chat_template(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if template:
        cfg["chat_template"] = template
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # what readers older than transformers 5 know
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def model_bytes(folder: Path) -> int:
    """Bytes of an export's model files (``*.onnx`` and their external data; adapter files not included)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx.data")))


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    d = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    d.mkdir()
    return d


def install_folder(src: Path, out: Path, *, force: bool) -> None:
    """Rename the complete folder `src` to `out`. An existing `out` (allowed with `force`, or when empty) is
    moved aside first and deleted only after the rename, so `out` is always either the old or the new one."""
    old = None
    if out.exists() or out.is_symlink():
        if not force and (not out.is_dir() or any(out.iterdir())):
            raise BadInputError(f"output {out} exists and is not empty", "pass --force to replace it")
        old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, old)
    try:
        os.replace(src, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def export_onnx(
    model: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "int4",
    adapter=None,
    adapter_mode: str = "merge",
    int4_block_size: int = 32,
    int4_symmetric: bool = True,
    int4_accuracy_level: int = 4,
    execution_provider: str = "cpu",
    force: bool = False,
    workspace=None,
    name: str | None = None,
    eval_records: list[dict] | None = None,
    eval_texts: list[str] | None = None,
    max_new_tokens: int = 96,
    max_ppl_increase: float | None = None,
    min_task_retention: float | None = None,
    progress=None,
    _extra_files=None,
) -> ExportResult:
    """Export `model` (folder, artifact id/alias, or cached hub id) to ONNX in `out_dir`.

    `precision`: fp32 | fp16 (cuda/dml) | int8 | int4 (weight-only MatMulNBits; `int4_block_size`,
    `int4_symmetric` and `int4_accuracy_level` (0-4; 4 computes in int8 on CPU) apply to int8 too).
    `adapter`: an adapter folder or artifact, or several (a list, ``NAME=DIR`` strings, or a dict name ->
    ref) for ``adapter_mode="runtime"``; see the module docstring for the two modes. The first adapter is
    the export's default: the ``ort-genai`` engine uses it for requests that name none ("base" asks for the
    base model).

    `eval_records` (chat records ending with the reference answer) and/or `eval_texts` make it measure
    parity with the source (torch) model (:func:`slmops.export.parity.measure_parity`); the report goes into
    ``export.json``, the artifact's metrics and ``result.parity``. `max_ppl_increase` / `min_task_retention`
    are gates: failing one raises ``GateFailedError`` (exit 3; ``err.report`` holds the report) and nothing
    is written. With a `workspace` the export is registered as an ``export`` artifact (named `name`) whose
    parents are the model and adapter artifacts that are registered.
    `progress(message)` is called at each stage.
    """
    t0 = time.time()
    _require_packages()
    if (max_ppl_increase is not None and not eval_texts and not eval_records) or (
            min_task_retention is not None and not eval_records):
        raise BadInputError("a quality gate needs evaluation data: --max-ppl-increase needs texts or records, "
                            "--min-task-retention needs records with answers", "pass --eval-file FILE")
    plan = plan_export(model, out_dir, precision=precision, adapter=adapter, adapter_mode=adapter_mode,
                       int4_block_size=int4_block_size, int4_accuracy_level=int4_accuracy_level,
                       execution_provider=execution_provider, force=force, workspace=workspace)
    say = progress or (lambda msg: None)
    staging = _staging_dir(plan.out)
    try:
        built = _build(plan, staging, precision=precision, adapter_mode=adapter_mode, block_size=int4_block_size,
                       symmetric=int4_symmetric, accuracy_level=int4_accuracy_level,
                       execution_provider=execution_provider, workspace=workspace, say=say)
        result = ExportResult(
            out_dir=str(plan.out), format="onnx", precision=precision, execution_provider=execution_provider,
            adapter_mode=adapter_mode if plan.adapters else None,
            adapters={a.name: (f"{ADAPTERS_DIR}/{a.name}{ADAPTER_SUFFIX}" if adapter_mode == "runtime" else str(a.info.path))
                      for a in plan.adapters},
            default_adapter=plan.adapters[0].name if plan.adapters and adapter_mode == "runtime" else None,
            parameters=plan.parameters, size_bytes=model_bytes(built),
            source_fp16_bytes=plan.parameters * 2 if plan.parameters else None,
            source=str(plan.model_dir), notes=list(plan.notes),
        )
        if result.source_fp16_bytes:
            result.size_ratio_vs_fp16 = result.size_bytes / result.source_fp16_bytes
        info = _export_info(plan, result, int4_block_size=int4_block_size, int4_symmetric=int4_symmetric,
                            int4_accuracy_level=int4_accuracy_level)
        _write_json(built / EXPORT_INFO, info)
        if _extra_files is not None:
            _extra_files(built, plan)
        if eval_records or eval_texts:
            say("measuring parity with the source model")
            result.parity = _measure(plan, built, eval_records, eval_texts, max_new_tokens, result, adapter_mode)
            info["parity"] = result.parity.to_dict()
            _write_json(built / EXPORT_INFO, info)
            from slmops.export.parity import check_gates

            check_gates(result.parity, max_ppl_increase=max_ppl_increase, min_task_retention=min_task_retention)
        say(f"writing {plan.out}")
        install_folder(built, plan.out, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.wall_s = round(time.time() - t0, 2)
    if workspace is not None:
        result.artifact_id = register_export(workspace, plan.out, result, plan, name=name, config=info)
    return result


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _export_info(plan: _Plan, result: ExportResult, **int4: Any) -> dict[str, Any]:
    from slmops import __version__

    return {
        "format": "onnx", "precision": result.precision, "execution_provider": result.execution_provider,
        "source": str(plan.model_dir), "source_artifact": plan.model_art, "architecture": (plan.config.get("architectures") or [None])[0],
        "parameters": plan.parameters, "size_bytes": result.size_bytes,
        "int4": int4 if result.precision in ("int4", "int8") else None,
        "adapter_mode": result.adapter_mode, "adapters": result.adapters, "default_adapter": result.default_adapter,
        "adapter_artifacts": {a.name: a.artifact_id for a in plan.adapters if a.artifact_id},
        "slmops": __version__,
    }


def _build(plan: _Plan, staging: Path, *, precision: str, adapter_mode: str, block_size: int, symmetric: bool,
           accuracy_level: int, execution_provider: str, workspace, say) -> Path:
    """Build the export inside `staging`; returns the complete folder (still inside `staging`)."""
    src = plan.model_dir
    cache = staging / "cache"
    cache.mkdir()
    extra: dict[str, Any] = {"hf_token": "false"}
    if precision in ("int4", "int8"):
        extra.update(block_size=block_size, is_symmetric=str(symmetric).lower(), accuracy_level=accuracy_level)
    runtime = adapter_mode == "runtime" and plan.adapters
    modules: set[tuple[int, str]] = set()
    if plan.adapters and adapter_mode == "merge":
        say(f"merging adapter {plan.adapters[0].name} into the base")
        from slmops.adapters.merge import merge_adapter

        merged = staging / "merged"
        merge_adapter(str(src), str(plan.adapters[0].info.path), merged)  # not registered: only a step
        src = merged
    elif runtime:
        shapes = linear_shapes(plan.config)
        for a in plan.adapters:
            modules |= set(a.modules)
        rank = max(e["A"][0] for a in plan.adapters for e in a.modules.values())
        zero = _zero_lora(plan.model_dir, staging / "lora-layout", modules, shapes, plan.model_dir, rank)
        extra["adapter_path"] = str(zero)
        extra["nodes_to_exclude"] = ",".join(
            f"/model/layers.{layer}/{'attn' if proj in ATTENTION_PROJECTIONS else 'mlp'}/{proj}/lora_{ab}/MatMul"
            for layer, proj in sorted(modules) for ab in "AB")
    built = staging / "build"
    say(f"building ONNX ({precision}, {execution_provider}) with onnxruntime-genai's model builder")
    run_builder(src, built, precision=precision, execution_provider=execution_provider, cache_dir=cache,
                extra_options=extra, log_path=staging / "builder.log")
    for f in ("genai_config.json", "model.onnx"):
        if not (built / f).is_file():
            raise SlmopsError(f"the model builder finished without writing {f}", "run with --verbose for its log")
    _finish_tokenizer_files(src, built)
    if not runtime:
        return built
    say("making the LoRA branches swappable")
    final = staging / "model"
    slots = _make_lora_inputs(built, final)
    want = {f"model.layers.{layer}.{'attn' if proj in ATTENTION_PROJECTIONS else 'mlp'}.{proj}.lora_{ab}.MatMul.weight"
            for layer, proj in modules for ab in "AB"}
    if set(slots) != want:
        raise SlmopsError(f"the model builder laid out the LoRA branches differently than expected ({len(slots)} "
                          f"inputs, {len(want)} expected)", "export with adapter_mode='merge'")
    (final / ADAPTERS_DIR).mkdir()
    for a in plan.adapters:
        params = lora_parameters(a.info, slots, name=a.name)
        write_adapter_file(params, final / ADAPTERS_DIR / f"{a.name}{ADAPTER_SUFFIX}")
    return final


def _measure(plan: _Plan, built: Path, records, texts, max_new_tokens: int, result: ExportResult, adapter_mode: str):
    from slmops.engines.ortgenai_engine import OrtGenAIEngine
    from slmops.engines.torch_engine import TorchEngine
    from slmops.export.parity import measure_parity, texts_from_records

    adapters = {a.name: str(a.info.path) for a in plan.adapters[:1]}
    source = TorchEngine(plan.model_dir, adapters=adapters or None,
                         default_adapter=next(iter(adapters), None))
    candidate = OrtGenAIEngine(built)
    try:
        if not texts and records:
            texts = texts_from_records(records, source)
        return measure_parity(source, candidate, texts=texts, records=records, candidate_bytes=result.size_bytes,
                              source_fp16_bytes=result.source_fp16_bytes, max_new_tokens=max_new_tokens)
    finally:
        candidate.close()
        source.close()


def register_export(workspace, out: Path, result: ExportResult, plan: _Plan, *, name: str | None,
                    config: dict[str, Any]) -> str:
    """Register the folder `out` as an ``export`` artifact (files hard-linked where possible)."""
    from slmops.training.common import link_or_copy

    parents = [p for p in [plan.model_art, *[a.artifact_id for a in plan.adapters]] if p]
    metrics: dict[str, Any] = {"size_bytes": result.size_bytes, "source_fp16_bytes": result.source_fp16_bytes,
                               "size_ratio_vs_fp16": result.size_ratio_vs_fp16, "parameters": result.parameters}
    if result.parity is not None:
        metrics.update({k: v for k, v in result.parity.to_dict().items() if k != "notes" and v is not None})
    with workspace.create_artifact("export", name or out.name, config=config, parents=parents, metrics=metrics) as w:
        for p in out.rglob("*"):
            rel = p.relative_to(out)
            if p.is_dir():
                (w.path / rel).mkdir(parents=True, exist_ok=True)
            elif p.name != "slmops.json":
                (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(p, w.path / rel)
        return w.id


def export_onnx_adapter(adapter, export_dir: str | Path, *, name: str | None = None, workspace=None,
                        force: bool = False) -> Path:
    """Add a LoRA adapter to an existing runtime-mode ONNX export (``adapters/NAME.onnx_adapter``).

    Refuses, before writing anything, an export made without runtime adapters and an adapter that targets a
    projection the export has no LoRA branch for, or whose shapes differ from the exported model's (an
    adapter of another base). Returns the adapter file."""
    from slmops.adapters.core import check_adapter_name, read_adapter, resolve_ref

    _require_packages()
    folder = Path(export_dir).expanduser()
    if workspace is not None:
        try:
            folder = workspace.resolve(str(export_dir))
        except NotFoundError:
            pass
    if not (folder / "genai_config.json").is_file():
        raise BadInputError(f"{folder} is not an ONNX export (no genai_config.json)")
    if (folder / "slmops.json").is_file():
        raise BadInputError(f"{folder} is a registered artifact, whose files never change",
                            "add adapters to the exported folder (--out of the export), or export again with all "
                            "adapters")
    slots = read_lora_slots(folder)
    if not slots:
        raise BadInputError(f"the export {folder} has no swappable LoRA branches",
                            "export the base with adapter_mode='runtime' (--adapter-mode runtime) and this adapter")
    apath, aart = resolve_ref(adapter, workspace)
    info = read_adapter(apath)
    name = check_adapter_name(name or _adapter_default_name(info, aart, workspace))
    target = folder / ADAPTERS_DIR / f"{name}{ADAPTER_SUFFIX}"
    if target.exists() and not force:
        raise BadInputError(f"{target} exists", "pass force=True (--force) to replace it, or choose another name")
    source_cfg = {}
    info_path = folder / EXPORT_INFO
    export_info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    src = export_info.get("source")
    if src and (Path(src) / "config.json").is_file():
        source_cfg = json.loads((Path(src) / "config.json").read_text(encoding="utf-8"))
    if source_cfg:
        _, problems = inspect_adapter(info, source_cfg, runtime=True, name=name)
        if problems:
            raise BadInputError("cannot add the adapter: " + "; ".join(problems))
    params = lora_parameters(info, slots, name=name)  # refuses adapters that do not fit the graph
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    write_adapter_file(params, tmp)
    os.replace(tmp, target)
    if export_info:
        export_info.setdefault("adapters", {})[name] = f"{ADAPTERS_DIR}/{target.name}"
        _write_json(info_path, export_info)
    return target


__all__ = [
    "ADAPTER_MODES", "EXECUTION_PROVIDERS", "PRECISIONS", "ExportResult", "export_onnx", "export_onnx_adapter",
    "inspect_adapter", "install_folder", "linear_shapes", "lora_parameters", "model_bytes", "plan_export",
    "read_lora_slots", "run_builder", "supported_architectures",
]

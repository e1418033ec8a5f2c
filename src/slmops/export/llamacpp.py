"""llama.cpp tooling for GGUF export: finding the converter, running it, quantizing, importance matrices.

Two parts of llama.cpp are used, never re-implemented:

* **the converter** (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` with their ``conversion/``
  package and ``gguf-py``). These scripts are not part of the installed ``llama_cpp`` package; they ship in
  the llama-cpp-python *sdist* under ``vendor/llama.cpp``. ``install_converter`` extracts them from that
  sdist into ``<venv>/share/slmops/llama.cpp`` (``make llama-cpp`` does it). At run time the converter is
  looked up, in order, in ``$SLMOPS_LLAMA_CPP_DIR`` (any llama.cpp checkout), ``<sys.prefix>/share/slmops/
  llama.cpp`` and ``~/.cache/slmops/llama.cpp``; nothing is downloaded at run time.
* **the quantizer** (``llama_cpp.llama_model_quantize``, the C API of the installed llama-cpp-python), called
  through ctypes, with an optional importance matrix passed as ``llama_model_imatrix_data`` entries.

The converter runs in a subprocess (``python -m slmops.export._gguf_convert``) so that its module-level
imports (its own ``gguf-py`` first on ``sys.path``) never mix with this process. The wrapper can override
the converter's BPE pre-tokenizer detection, which refuses tokenizers whose probe hash it does not know - as
every locally trained byte-level BPE (such as the demo's) is.

Importance matrix: llama.cpp's ``llama-imatrix`` tool is a C++ program that llama-cpp-python does not build.
``compute_imatrix`` computes the same statistic from the Hugging Face model instead: for every linear layer,
the mean over calibration tokens of the squared input activations per input column (what ``llama-quantize``
reads from an imatrix file: sums / counts). The entries are keyed by GGUF tensor name and handed to
``llama_model_quantize``; the quantizer itself is llama.cpp's.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, SlmopsError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ENV_DIR = "SLMOPS_LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# what install_converter copies out of <sdist>/vendor/llama.cpp
CONVERTER_FILES = (CONVERTER, LORA_CONVERTER, "conversion", "gguf-py", "LICENSE")
STAMP = "SLMOPS_SOURCE.json"
# CMake flags for building llama-cpp-python on x86-64 CPUs with AMX: a native build (-march=native) crashes
# on every quantized model in ggml's AMX matmul (see shared/ENVIRONMENT.md); these keep AVX-512 and turn AMX off
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
              "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF")
INSTALL_HINT = ("build it with `make llama-cpp` (llama-cpp-python with CMAKE_ARGS for this CPU, plus llama.cpp's "
                "converter scripts), or by hand: CMAKE_ARGS=\"...\" pip install llama-cpp-python==" + LLAMA_CPP_PYTHON_VERSION
                + " gguf sentencepiece (see `python -m slmops.export.llamacpp --help`)")

# llama_ftype values (include/llama.h) for the quantization names slmops accepts; f32/f16/bf16 come from the
# converter directly
QUANT_TYPES: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
    "iq2_xxs": 19, "iq2_xs": 20, "q2_k_s": 21, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25,
    "iq3_s": 26, "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31,
}
FLOAT_TYPES = ("f32", "f16", "bf16")
# types whose quality depends on an importance matrix; llama.cpp refuses most IQ types without one
NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "q2_k_s", "iq3_xxs")
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 32: "bf16", **{v: k for k, v in QUANT_TYPES.items()}}


def quant_names() -> list[str]:
    return [*FLOAT_TYPES, *QUANT_TYPES]


def normalize_quant(quant: str) -> str:
    q = str(quant).strip().lower().replace("-", "_")
    if q in ("fp16", "float16"):
        q = "f16"
    elif q in ("fp32", "float32"):
        q = "f32"
    elif q == "bfloat16":
        q = "bf16"
    if q not in FLOAT_TYPES and q not in QUANT_TYPES:
        raise BadInputError(f"unknown GGUF quantization {quant!r}",
                            f"use one of: {', '.join(quant_names())} (q4_k_m is the usual choice)")
    return q


# --------------------------------------------------------------------------------------------- availability


def llama_cpp_available() -> bool:
    """True when llama-cpp-python can be imported (its shared library loads)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or OSError when the shared library does not load
        return False
    return True


def unavailable_reason() -> str | None:
    """Why GGUF export and the llama.cpp engine cannot run here (llama-cpp-python or llama.cpp's converter
    scripts missing), or None when they can."""
    if not llama_cpp_available():
        return "llama-cpp-python is not installed (`make llama-cpp` builds it)"
    try:
        if find_converter_dir(required=False) is None:
            return "llama.cpp's converter scripts are not installed (`make llama-cpp`)"
    except SlmopsError as e:
        return str(e)
    return None


def require_llama_cpp():
    """Import and return ``llama_cpp``, or raise a clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise SlmopsError("llama-cpp-python is not installed (needed for GGUF export and the llama.cpp engine)",
                          INSTALL_HINT) from e
    except OSError as e:  # the package is there but its shared library does not load
        raise SlmopsError(f"llama-cpp-python is installed but its library does not load: {e}", INSTALL_HINT) from e
    return llama_cpp


def _candidate_dirs() -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_DIR)
    if env:
        out.append((f"${ENV_DIR}", Path(env).expanduser()))
    out.append(("the virtual environment", Path(sys.prefix) / "share" / "slmops" / "llama.cpp"))
    out.append(("the user cache", Path.home() / ".cache" / "slmops" / "llama.cpp"))
    return out


def is_converter_dir(path: Path) -> bool:
    return (path / CONVERTER).is_file() and (path / "gguf-py" / "gguf").is_dir()


def find_converter_dir(required: bool = True) -> Path | None:
    """The llama.cpp folder holding ``convert_hf_to_gguf.py`` (+ ``conversion/``, ``gguf-py/``).

    Looked up in ``$SLMOPS_LLAMA_CPP_DIR``, ``<sys.prefix>/share/slmops/llama.cpp`` and
    ``~/.cache/slmops/llama.cpp``. An env var that points at a folder without the converter is an error (not
    silently skipped)."""
    env = os.environ.get(ENV_DIR)
    if env and not is_converter_dir(Path(env).expanduser()):
        raise BadInputError(
            f"${ENV_DIR} is {env}, which has no {CONVERTER} with gguf-py/ beside it",
            "point it at a llama.cpp source tree (or the folder `python -m slmops.export.llamacpp "
            "install-converter` writes), or unset it",
        )
    for _, path in _candidate_dirs():
        if is_converter_dir(path):
            return path
    if not required:
        return None
    looked = "; ".join(f"{what}: {p}" for what, p in _candidate_dirs())
    raise SlmopsError(
        f"llama.cpp's converter ({CONVERTER}) was not found (looked in {looked})",
        "run `make llama-cpp`, or `python -m slmops.export.llamacpp install-converter --sdist "
        f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz` (the sdist pip downloads), or set ${ENV_DIR} "
        "to a llama.cpp checkout",
    )


def converter_source(path: Path) -> dict[str, Any]:
    """What the converter folder says about where it came from (written by install_converter)."""
    stamp = path / STAMP
    if stamp.is_file():
        try:
            return json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            pass
    return {"path": str(path)}


def install_converter(sdist: str | Path | None = None, dest: str | Path | None = None, *,
                      version: str | None = None) -> Path:
    """Extract llama.cpp's converter scripts from a llama-cpp-python sdist into `dest`.

    `sdist`: the ``llama_cpp_python-X.tar.gz`` file (or an unpacked sdist folder). Without it, pip downloads
    the sdist of `version` (default: the installed llama-cpp-python, else the pinned one) from the package
    index: an install-time step, never done at run time. `dest` defaults to
    ``<sys.prefix>/share/slmops/llama.cpp``. The folder is replaced atomically."""
    dest_p = Path(dest).expanduser() if dest else Path(sys.prefix) / "share" / "slmops" / "llama.cpp"
    with tempfile.TemporaryDirectory(prefix="slmops-llamacpp-") as tmp:
        tmp_p = Path(tmp)
        if sdist is None:
            version = version or _installed_version() or LLAMA_CPP_PYTHON_VERSION
            cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                   f"llama-cpp-python=={version}", "-d", str(tmp_p / "dl")]
            log.info("downloading the llama-cpp-python %s sdist: %s", version, " ".join(cmd))
            subprocess.run(cmd, check=True)
            found = sorted((tmp_p / "dl").glob("llama_cpp_python-*.tar.gz"))
            if not found:
                raise SlmopsError("pip download did not produce a llama_cpp_python sdist")
            sdist = found[0]
        src = Path(sdist).expanduser()
        if not src.exists():
            raise BadInputError(f"no such sdist: {src}")
        if src.is_dir():
            root = src
        else:
            with tarfile.open(src) as tf:
                members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and _wanted(m.name)]
                if not members:
                    raise BadInputError(f"{src} has no vendor/llama.cpp/{CONVERTER}: not a llama-cpp-python sdist")
                tf.extractall(tmp_p / "x", members=members, filter="data")
            root = next((tmp_p / "x").iterdir())
        llama_dir = root / "vendor" / "llama.cpp" if (root / "vendor" / "llama.cpp").is_dir() else root
        if not is_converter_dir(llama_dir):
            raise BadInputError(f"{src} has no {CONVERTER} with gguf-py/: not a llama-cpp-python sdist or llama.cpp tree")
        stage = dest_p.parent / f".{dest_p.name}.partial"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        for name in CONVERTER_FILES:
            p = llama_dir / name
            if p.is_dir():
                shutil.copytree(p, stage / name, ignore=shutil.ignore_patterns("__pycache__", "tests", "examples"))
            elif p.is_file():
                shutil.copy2(p, stage / name)
        sdist_name = src.name
        m = re.search(r"(\d+\.\d+\.\d+)", sdist_name)
        (stage / STAMP).write_text(json.dumps({"sdist": sdist_name, "llama_cpp_python": m.group(1) if m else None},
                                              indent=2) + "\n")
        old = None
        if dest_p.exists():
            old = dest_p.parent / f".{dest_p.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest_p, old)
        os.replace(stage, dest_p)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dest_p


def _wanted(name: str) -> bool:
    rel = name.split("/vendor/llama.cpp/", 1)[1]
    top = rel.split("/", 1)[0]
    return top in CONVERTER_FILES


def _installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------- the converter


def _converter_env(llama_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py, not the pip `gguf`
    env["HF_HUB_OFFLINE"] = "1"  # the converter must never reach for the hub
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the slmops package
    env["PYTHONPATH"] = os.pathsep.join([src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def run_converter_tool(args: list[str], llama_dir: Path, *, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m slmops.export._gguf_convert ARGS`` and return its JSON result (last stdout line).

    Failures raise ``BadInputError`` (the converter refused the input: exit 2) or ``SlmopsError`` with the
    tail of the converter's log."""
    cmd = [sys.executable, "-m", "slmops.export._gguf_convert", "--llama-cpp-dir", str(llama_dir), *args]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_converter_env(llama_dir), timeout=timeout)
    result: dict[str, Any] = {}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    result.setdefault("log", proc.stderr[-4000:])
    if proc.returncode == 0 and result.get("ok", True):
        return result
    message = result.get("error") or f"llama.cpp's converter failed (exit {proc.returncode})"
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    if proc.returncode == 2 or result.get("bad_input"):
        raise BadInputError(message, result.get("hint"))
    raise SlmopsError(f"{message}\n--- converter log (tail) ---\n{tail}", result.get("hint"))


# --------------------------------------------------------------------------------------------- llama.cpp logs


class LlamaLog:
    """llama.cpp's log lines captured while it runs (instead of printed), for errors and warnings."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._partial = ""

    def add(self, text: str) -> None:
        self._partial += text
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            self.lines.append(line)

    def tail(self, n: int = 15) -> str:
        return "\n".join([*self.lines, self._partial][-n:]).strip()

    def matching(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [ln for ln in self.lines if rx.search(ln)]


_LOG_LOCK = threading.Lock()


@contextmanager
def capture_llama_log() -> Iterator[LlamaLog]:
    """Route llama.cpp's log callback into a `LlamaLog` for the duration (then back to llama-cpp-python's)."""
    llama_cpp = require_llama_cpp()
    from llama_cpp import _logger

    captured = LlamaLog()

    @llama_cpp.llama_log_callback
    def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            captured.add(text.decode("utf-8", errors="replace"))
        except Exception:  # noqa: BLE001 - never raise into C
            pass

    with _LOG_LOCK:
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
        try:
            yield captured
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def quiet_llama_log() -> None:
    """Stop llama-cpp-python from printing llama.cpp's info logs (errors still print)."""
    require_llama_cpp()
    from llama_cpp import _logger

    if _logger.logger.level == logging.NOTSET:
        _logger.set_verbose(False)


# --------------------------------------------------------------------------------------------- quantizing


@dataclass
class QuantizeReport:
    quant: str
    seconds: float
    fallbacks: list[str] = field(default_factory=list)  # tensors llama.cpp kept at another type (shape)
    imatrix_entries: int = 0


# tensor types for llama-quantize's --token-embedding-type / --output-tensor-type (ggml_type values)
TENSOR_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
                                "q2_k": 10, "q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "bf16": 30}


def quantize(src: Path, dst: Path, quant: str, *, imatrix: dict[str, Any] | None = None,
             threads: int | None = None, token_embedding_type: str | None = None) -> QuantizeReport:
    """Quantize the GGUF `src` into `dst` with llama.cpp's quantizer (``llama_model_quantize``).

    `token_embedding_type` overrides the mix's type for the token embeddings (llama-quantize's
    ``--token-embedding-type``; e.g. ``q4_k``: the q4_k_m mix keeps them at q6_k, which is a large share of
    a small model with a big vocabulary).

    `imatrix`: GGUF tensor name -> 1-D float array (mean squared input activation per input column), as
    :func:`compute_imatrix` returns. Raises ``SlmopsError`` with llama.cpp's own message on failure."""
    import time

    import numpy as np

    llama_cpp = require_llama_cpp()
    q = normalize_quant(quant)
    if q not in QUANT_TYPES:
        raise BadInputError(f"{q} is not a llama.cpp quantization type (f32/f16/bf16 come from the converter)")
    if q in NEEDS_IMATRIX and not imatrix:
        raise BadInputError(f"{q} needs an importance matrix", "pass a calibration text file (--imatrix CALIB.txt)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[q]
    if token_embedding_type is not None:
        if token_embedding_type.lower() not in TENSOR_TYPES:
            raise BadInputError(f"unknown tensor type {token_embedding_type!r}",
                                f"use one of {', '.join(TENSOR_TYPES)}")
        params.token_embedding_type = TENSOR_TYPES[token_embedding_type.lower()]
    params.nthread = threads or os.cpu_count() or 1
    keep: list[Any] = []  # ctypes buffers must outlive the call
    n_entries = 0
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
            name_b = ctypes.create_string_buffer(name.encode("utf-8"))
            keep += [arr, name_b]
            entries[i].name = ctypes.cast(name_b, ctypes.c_char_p)
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the terminator
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        n_entries = len(imatrix)
    t0 = time.perf_counter()
    with capture_llama_log() as captured:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0 or not dst.is_file():
        raise SlmopsError(f"llama.cpp could not quantize {src.name} to {q} (code {rc})",
                          "llama.cpp says:\n" + captured.tail())
    fallbacks = [re.sub(r"\s+", " ", ln.replace("warning:", "")).strip()
                 for ln in captured.matching(r"falling back to")]
    return QuantizeReport(quant=q, seconds=time.perf_counter() - t0, fallbacks=fallbacks, imatrix_entries=n_entries)


# --------------------------------------------------------------------------------------------- GGUF metadata


def read_gguf_metadata(path: str | Path, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays are left out, e.g. the token list), read with the
    ``gguf`` package (``gguf-py``) without loading tensors."""
    try:
        from gguf import GGUFReader
        from gguf.constants import GGUFValueType
    except ImportError as e:
        raise SlmopsError("the `gguf` package is not installed", INSTALL_HINT) from e
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises all sorts of errors
        raise BadInputError(f"{path} is not a readable GGUF file: {e}") from e
    out: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if keys is not None and name not in keys:
            continue
        if not fld.types or fld.types[0] == GGUFValueType.ARRAY:
            continue
        try:
            out[name] = fld.contents()
        except Exception:  # noqa: BLE001
            continue
    return out


def gguf_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in ggml order (ne0 first: ne0 is the row length, the input width)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    return {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}


# --------------------------------------------------------------------------------------------- importance matrix


def read_calibration_texts(path: str | Path, max_texts: int = 2000, tokenizer: Any = None) -> list[str]:
    """Calibration text for an importance matrix: a plain text file (paragraphs separated by blank lines, or
    one text per line) or a dataset file slmops reads (each record rendered with `tokenizer`'s chat template
    when it has one, else its message contents joined)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"calibration file not found: {p}")
    if p.suffix.lower() in (".txt", ".text", ".md", ""):
        raw = p.read_text(encoding="utf-8", errors="replace")
        parts = [s.strip() for s in re.split(r"\n\s*\n", raw) if s.strip()]
        if len(parts) <= 1:
            parts = [s.strip() for s in raw.splitlines() if s.strip()]
    else:
        from slmops.data import load_dataset_file

        ds = load_dataset_file(str(p), purpose="prompts")
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            parts = [tokenizer.apply_chat_template(rec["messages"], tokenize=False) for rec in ds.records]
        else:
            parts = ["\n".join(str(m.get("content", "")) for m in rec["messages"]) for rec in ds.records]
    parts = [s for s in parts if s][:max_texts]
    if not parts:
        raise BadInputError(f"calibration file {p} has no text")
    return parts


def compute_imatrix(model_dir: str | Path, texts: list[str], gguf_file: str | Path, *,
                    max_tokens: int = 32768, chunk: int = 512) -> tuple[dict[str, Any], dict[str, Any]]:
    """The importance matrix of the Hugging Face model in `model_dir` on `texts`, keyed by the tensor names
    of `gguf_file` (the converted model).

    For every ``nn.Linear`` the mean over calibration tokens of x_j^2 for each input column j is collected
    (what llama.cpp's imatrix tool accumulates and llama-quantize hands to the quantizer as sums / counts).
    HF module names are mapped to GGUF names with gguf-py's tensor name map; each entry's length is checked
    against the GGUF tensor's row length. Returns (entries, info)."""
    import numpy as np
    import torch

    from slmops.models.load import load_model, load_tokenizer

    shapes = gguf_tensor_shapes(gguf_file)
    meta = read_gguf_metadata(gguf_file, ("general.architecture",))
    arch = meta.get("general.architecture")
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype="float32").eval()
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    name_map = _tensor_name_map(arch, n_layers)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(key: str):
        def hook(_mod, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            s = (x * x).sum(0)
            sums[key] = sums[key] + s if key in sums else s
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(make_hook(mod_name)))
    seen = 0
    try:
        with torch.inference_mode():
            for text in texts:
                ids = tok(text, add_special_tokens=False)["input_ids"]
                for start in range(0, len(ids), chunk):
                    part = ids[start:start + chunk]
                    if not part:
                        continue
                    model(input_ids=torch.tensor([part]))
                    seen += len(part)
                    if seen >= max_tokens:
                        break
                if seen >= max_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise BadInputError("the calibration texts tokenize to nothing")
    entries: dict[str, Any] = {}
    unmapped = []
    for key, s in sums.items():
        gguf_name = name_map(key)
        if gguf_name is None or gguf_name not in shapes:
            unmapped.append(key)
            continue
        values = (s / counts[key]).numpy().astype(np.float32)
        # columns that never saw activation (e.g. zero-padded MLP units) get a tiny positive weight, so no
        # quantization block is weighted all-zero
        floor = float(values.mean()) * 1e-6 if values.size and values.mean() > 0 else 1e-12
        values = np.maximum(values, max(floor, 1e-12)).astype(np.float32)
        if shapes[gguf_name][0] != values.size:
            unmapped.append(key)
            continue
        entries[gguf_name] = values
    info = {"tokens": seen, "texts": len(texts), "entries": len(entries), "unmapped": sorted(unmapped)}
    if not entries:
        raise SlmopsError("no importance-matrix entry could be mapped to the GGUF tensors "
                          f"(architecture {arch}); export without --imatrix")
    return entries, info


def _tensor_name_map(arch: str | None, n_layers: int):
    """HF module name ("model.layers.0.self_attn.q_proj") -> GGUF tensor name ("blk.0.attn_q.weight")."""
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise SlmopsError(f"the gguf package does not know architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(arch_id, n_layers)

    def name(hf_module: str) -> str | None:
        return tmap.get_name(hf_module + ".weight", try_suffixes=(".weight",))

    return name


# --------------------------------------------------------------------------------------------- CLI (install time)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m slmops.export.llamacpp",
        description="Install-time helpers for slmops' GGUF export (llama.cpp). Nothing here runs at export time.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install-converter", help="extract convert_hf_to_gguf.py & co. from a llama-cpp-python sdist")
    inst.add_argument("--sdist", help="llama_cpp_python-X.tar.gz (default: pip download of the installed version)")
    inst.add_argument("--dest", help="target folder (default: <sys.prefix>/share/slmops/llama.cpp)")
    inst.add_argument("--version", help="llama-cpp-python version to download when --sdist is not given")
    sub.add_parser("status", help="print whether llama-cpp-python and the converter are found")
    sub.add_parser("cmake-args", help="print the CMAKE_ARGS to build llama-cpp-python with")
    args = parser.parse_args(argv)
    if args.cmd == "install-converter":
        path = install_converter(args.sdist, args.dest, version=args.version)
        print(f"llama.cpp converter installed in {path}")
        return 0
    if args.cmd == "cmake-args":
        print(CMAKE_ARGS)
        return 0
    status = {"llama_cpp_python": _installed_version(), "importable": llama_cpp_available()}
    try:
        conv = find_converter_dir(required=False)
        status["converter_dir"] = str(conv) if conv else None
    except SlmopsError as e:
        status["converter_dir"] = None
        status["error"] = str(e)
    print(json.dumps(status, indent=2))
    return 0 if status["importable"] and status["converter_dir"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())

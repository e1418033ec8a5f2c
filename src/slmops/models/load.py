"""Load tokenizers and causal LMs from a local folder or a Hugging Face Hub id, offline-aware.

A model reference is either a local folder in the Hugging Face layout (``config.json``, ``*.safetensors``,
tokenizer files) or a hub id (``org/name``). The Hub is often unreachable (air-gapped machines, CI), so a
hub id is first looked up in the local Hugging Face cache; when it is not there the Hub's reachability is
checked with one short socket connect (or ``HF_HUB_OFFLINE=1``), and an unreachable Hub fails at once with
a ``NotFoundError`` that says how to bring the model over, instead of hanging in download retries.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from slmops.errors import BadInputError, NotFoundError

DEFAULT_ENDPOINT = "https://huggingface.co"
REACHABILITY_TIMEOUT_S = 2.0

CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Any one of these makes a folder loadable by AutoTokenizer (fast tokenizer, sentencepiece, BPE or WordPiece vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "true", "yes", "on"}

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}


# ------------------------------------------------------------------------------------------- references


def is_hub_id(ref: str) -> bool:
    """True when `ref` reads as a Hugging Face Hub id (``org/name``) and is not an existing local path."""
    ref = str(ref)
    if not _HUB_ID.match(ref) or ".." in ref or ref.endswith((".", "-")):
        return False
    return not Path(ref).exists()


def hub_is_offline() -> bool:
    """True when the environment forbids Hub access (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The Hub endpoint in use: ``HF_ENDPOINT`` or https://huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT


def hub_is_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Whether the Hub endpoint answers within `timeout` seconds (name lookup included).

    ``HF_HUB_OFFLINE=1`` answers False at once without touching the network. Otherwise one TCP connect to
    the ``HF_ENDPOINT`` host (huggingface.co:443 by default), then a verified TLS handshake for https (an
    intercepting proxy or firewall that accepts every connection does not count as the Hub) or an HTTP
    status line for http. The probe runs in a daemon thread so a slow DNS resolver cannot stretch it past
    `timeout`.
    """
    if hub_is_offline():
        return False
    url = urlparse(hub_endpoint())
    host = url.hostname
    if not host:
        return False
    https = url.scheme != "http"
    port = url.port or (443 if https else 80)
    deadline = time.monotonic() + timeout
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                if https:
                    with ssl.create_default_context().wrap_socket(sock, server_hostname=host):
                        result.append(True)
                else:
                    sock.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                    result.append(sock.recv(16).startswith(b"HTTP/"))
        except (OSError, ValueError):  # refused, timed out, unresolvable, TLS failure
            result.append(False)

    worker = threading.Thread(target=probe, name="slmops-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def _unreachable(ref: str) -> NotFoundError:
    why = "HF_HUB_OFFLINE is set" if hub_is_offline() else f"no connection to {urlparse(hub_endpoint()).hostname}"
    local = f"; there is no local folder {ref!r} either" if "/" in ref else ""
    return NotFoundError(
        f"model {ref!r} is not in the local Hugging Face cache and the Hugging Face Hub is unreachable ({why}){local}",
        f"download it on a connected machine with `huggingface-cli download {ref} --local-dir DIR` "
        f"(or `hf download {ref} --local-dir DIR`), copy DIR here and pass the folder",
    )


def _cached_snapshot(ref: str) -> Path | None:
    """The folder of `ref`'s snapshot in the local Hugging Face cache, or None (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), invalid id, unreadable cache: all mean "no"
        return None


def _resolve(ref: str | os.PathLike) -> Path | str:
    """A local folder for `ref`, or the hub id itself when it must (and can) be downloaded."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            hint = "load .gguf files with the llama.cpp engine" if path.suffix == ".gguf" else None
            raise BadInputError(f"expected a model folder, got a file: {path}", hint)
        return path
    if is_hub_id(text):
        snapshot = _cached_snapshot(text)
        if snapshot is not None:
            return snapshot
        if not hub_is_reachable():
            raise _unreachable(text)
        return text
    where = text if str(path.resolve()) == text else f"{text} ({path.resolve()})"
    raise NotFoundError(
        f"no such model folder: {where}",
        "pass a folder with config.json, weights and tokenizer files, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct",
    )


def check_model_folder(path: str | os.PathLike, *, weights: bool = True, tokenizer: bool = True) -> Path:
    """Check that `path` is a Hugging Face model folder; return it as a Path.

    With `weights`, ``config.json`` and a weight file must be present; with `tokenizer`, a tokenizer file
    (``tokenizer.json``, ``tokenizer.model``, ``vocab.json`` or ``vocab.txt``). Raises ``NotFoundError``
    when the folder does not exist and ``BadInputError`` naming the missing file otherwise.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise NotFoundError(f"no such model folder: {folder}")
    if not folder.is_dir():
        raise BadInputError(f"expected a model folder, got a file: {folder}")
    missing = []
    if weights:
        if not (folder / CONFIG_FILE).is_file():
            missing.append(f"{CONFIG_FILE} (the model config)")
        if not _weight_files(folder):
            missing.append("model.safetensors (or another weight file: " + ", ".join(WEIGHT_FILES[1:]) + ")")
    if tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer.json (or " + ", ".join(TOKENIZER_FILES[1:]) + ")")
    if missing:
        raise BadInputError(
            f"model folder {folder} is missing " + "; ".join(missing),
            "save models with model.save_pretrained(DIR) and tokenizers with tokenizer.save_pretrained(DIR)",
        )
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and not p.name.startswith(("training_args", "optimizer", "scheduler", "rng_state")))


# ---------------------------------------------------------------------------------------------- loading


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}", f"choose one of: auto, {', '.join(sorted(_DTYPES))}")
    return getattr(torch, _DTYPES[name])


def load_tokenizer(ref: str | os.PathLike, **kw: Any):
    """Load a tokenizer from a local folder or a hub id (see the module docstring for the offline rules).

    Extra keyword arguments go to ``AutoTokenizer.from_pretrained``. Raises ``NotFoundError`` for a missing
    folder or an unreachable hub id, ``BadInputError`` for a folder without tokenizer files.
    """
    from transformers import AutoTokenizer

    source = _resolve(ref)
    if isinstance(source, Path):
        check_model_folder(source, weights=False, tokenizer=True)
        kw.setdefault("local_files_only", True)
    try:
        return AutoTokenizer.from_pretrained(str(source), **kw)
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", ref, e) from e


def load_model(ref: str | os.PathLike, dtype: Any = None, device: str = "cpu", **kw: Any):
    """Load a causal LM (``AutoModelForCausalLM``) from a local folder or a hub id, in eval mode.

    `dtype`: None or "auto" keeps the dtype the weights are stored in; otherwise a ``torch.dtype`` or one of
    float32/fp32, float16/fp16, bfloat16/bf16. `device`: where to put the model ("cpu", "cuda", "cuda:1",
    "mps"). Extra keyword arguments go to ``from_pretrained``. Raises ``NotFoundError`` for a missing folder
    or an unreachable hub id, ``BadInputError`` for a folder without ``config.json`` or weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = _torch_dtype(dtype)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device {device!r} requested but CUDA is not available", "use device='cpu'")
    source = _resolve(ref)
    if isinstance(source, Path):
        check_model_folder(source, weights=True, tokenizer=False)
        kw.setdefault("local_files_only", True)
    kw["dtype"] = "auto" if torch_dtype is None else torch_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kw)
    except (OSError, ValueError) as e:
        raise _load_error("model", ref, e) from e
    if not getattr(model, "is_quantized", False):  # a bitsandbytes model is placed by from_pretrained
        model.to(device)
    model.eval()
    return model


def _load_error(what: str, ref: Any, e: Exception) -> Exception:
    if is_hub_id(str(ref)):
        return NotFoundError(f"could not load {what} {str(ref)!r} from the Hugging Face Hub: {e}")
    return BadInputError(f"could not load {what} from {ref}: {e}")


# ------------------------------------------------------------------------------------------------- info


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise BadInputError(f"{path} is not a safetensors file")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _params_from_safetensors(files: list[Path]) -> tuple[int, str | None]:
    """Stored parameter count and the most common dtype, from safetensors headers (no tensor data read)."""
    total = 0
    by_dtype: dict[str, int] = {}
    for f in files:
        for info in _safetensors_header(f).values():
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    dtype = max(by_dtype, key=by_dtype.get) if by_dtype else None
    return total, _SAFETENSORS_DTYPES.get(dtype, dtype.lower()) if dtype else None


def _params_from_config(config: Any) -> int:
    """Parameter count of the architecture, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from slmops.models.presets import count_parameters

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_parameters(model)


def _config_dtype(config: Any) -> str | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def model_info(ref: str | os.PathLike) -> dict[str, Any]:
    """Describe a model without loading its weights.

    Returns a JSON-serialisable dict: ``path``, ``architecture``, ``model_type``, ``params`` (from the
    safetensors headers, else counted on the meta device), ``vocab_size``, ``hidden_size``,
    ``num_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
    ``max_position_embeddings``, ``tie_word_embeddings``, ``dtype``, ``bytes_on_disk`` (the weight files)
    and ``weight_files``. Same reference rules and errors as :func:`load_model`.
    """
    from transformers import AutoConfig

    source = _resolve(ref)
    weight_files: list[Path] = []
    bytes_on_disk: int | None
    if isinstance(source, Path):
        folder = check_model_folder(source, weights=True, tokenizer=False)
        try:
            config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise BadInputError(f"could not read {folder / CONFIG_FILE}: {e}") from e
        weight_files = _weight_files(folder)
        bytes_on_disk = sum(p.stat().st_size for p in weight_files)
        where = str(folder)
    else:  # a reachable hub id that is not cached: config from the Hub, sizes from the file listing
        from huggingface_hub import HfApi

        config = AutoConfig.from_pretrained(source)
        info = HfApi(endpoint=hub_endpoint()).model_info(source, files_metadata=True)
        siblings = [s for s in info.siblings or [] if s.rfilename.endswith(WEIGHT_SUFFIXES) and "/" not in s.rfilename]
        bytes_on_disk = sum(s.size or 0 for s in siblings) if siblings else None
        where = source
    safetensors = [p for p in weight_files if p.suffix == ".safetensors"]
    if safetensors:
        params, dtype = _params_from_safetensors(safetensors)
    else:
        params, dtype = _params_from_config(config), _config_dtype(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    archs = getattr(config, "architectures", None) or []
    return {
        "path": where,
        "architecture": archs[0] if archs else type(config).__name__.replace("Config", "ForCausalLM"),
        "model_type": config.model_type,
        "params": params,
        "vocab_size": getattr(text, "vocab_size", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_key_value_heads": getattr(text, "num_key_value_heads", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "dtype": dtype,
        "bytes_on_disk": bytes_on_disk,
        "weight_files": [p.name for p in weight_files],
    }


__all__ = [
    "check_model_folder",
    "hub_endpoint",
    "hub_is_offline",
    "hub_is_reachable",
    "is_hub_id",
    "load_model",
    "load_tokenizer",
    "model_info",
]

"""Hand a Hugging Face model folder (and its LoRA adapters) to vLLM's OpenAI-compatible server.

``slmops serve MODEL=NAME --adapter NAME=DIR --engine vllm`` runs the command that :func:`vllm_command`
builds, so a model trained and checked with slmops is served at scale under the same model and adapter
names as slmops's own server::

    python -m vllm.entrypoints.openai.api_server --model /abs/model --served-model-name NAME \\
        --host 127.0.0.1 --port 8000 --enable-lora --max-loras 1 --max-lora-rank 16 \\
        --lora-modules support=/abs/adapter

vLLM serves one base model per process and reads only Hugging Face model folders here (``config.json``);
GGUF files and ONNX Runtime GenAI folders are served by slmops's own engines. The API key goes to vLLM
through the ``VLLM_API_KEY`` environment variable (see :class:`VllmLaunch`), never on the command line,
where ``ps`` would show it. Nothing here imports vLLM: the command can be built (``--dry-run``) anywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from slmops.errors import BadInputError, NotFoundError

API_KEY_ENV = "VLLM_API_KEY"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# --max-lora-rank accepts only these values (vllm/config/lora.py, MaxLoRARanks); an adapter's rank r is
# rounded up to the next one
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# flags vllm_command sets itself: giving them again in extra_args would silently override (argparse keeps
# the last value) or, for --api-key, put the key on the command line
_MANAGED_FLAGS = ("--model", "--served-model-name", "--host", "--port", "--api-key", "--lora-modules")


@dataclass
class VllmLaunch:
    """How to start vLLM: `argv` to execute, and `env`, the variables to add to the current environment
    (``VLLM_API_KEY`` when an API key is set; the key is never in `argv`)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        """The whole environment to run `argv` with: the current one plus `env`."""
        return {**os.environ, **self.env}


def vllm_available() -> str | None:
    """None when vLLM can be imported here; otherwise the reason it cannot, with what to do."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        found = False
    return None if found else "vllm is not installed: pip install vllm on a machine with a CUDA GPU"


def vllm_command(
    models: list[tuple[str, str]],
    adapters: dict[str, str] | None = None,
    *,
    host: str,
    port: int,
    api_key: str | None,
    max_model_len: int | None = None,
    extra_args: list[str] | None = None,
    executable: str | None = None,
) -> VllmLaunch:
    """The command line that serves one Hugging Face model folder (and LoRA adapters) with vLLM.

    `models` is ``[(path, served_name)]`` and must hold exactly one model (vLLM serves one base model per
    process); `adapters` maps adapter names (what clients put in ``model``) to PEFT LoRA folders, served
    with ``--enable-lora --max-loras N --max-lora-rank R --lora-modules name=path ...`` where R is the
    largest adapter rank ``r`` (adapter_config.json) rounded up to a rank vLLM accepts. `max_model_len`
    caps the context (``--max-model-len``); `extra_args` are appended as given (any other vLLM flag);
    `executable` is the Python that runs vLLM (default: this one). A Hugging Face hub id (``org/name``)
    that is not a local path is passed through for vLLM to download.

    Raises BadInputError, with the engine to use instead, for GGUF files, ONNX folders, adapter folders
    given as the model, and more than one model.
    """
    if not models:
        raise BadInputError("no model to serve with vLLM", "pass one Hugging Face model folder: slmops serve "
                                                           "MODEL=NAME --engine vllm")
    if len(models) > 1:
        names = ", ".join(name for _, name in models)
        raise BadInputError(
            f"vLLM serves one base model per process; {len(models)} were given ({names})",
            "start one `slmops serve MODEL=NAME --engine vllm --port P` per model, each on its own port "
            "(LoRA adapters of the same base can share one server: --adapter NAME=DIR)",
        )
    path, served_name = models[0]
    if not served_name:
        raise BadInputError(f"no served model name for {path}", "name it: slmops serve MODEL=NAME --engine vllm")
    if not 0 < port < 65536:
        raise BadInputError(f"port must be between 1 and 65535, got {port}")
    if max_model_len is not None and max_model_len < 1:
        raise BadInputError(f"max_model_len must be >= 1, got {max_model_len}")
    extra = list(extra_args or [])
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in _MANAGED_FLAGS:
            raise BadInputError(f"{flag} is set by slmops from its own options; do not pass it in the extra "
                                "vLLM arguments", "use slmops serve's MODEL=NAME, --host, --port, --api-key "
                                                  "and --adapter")

    argv = [executable or sys.executable, "-m", SERVER_MODULE,
            "--model", _model_path(path), "--served-model-name", served_name,
            "--host", host, "--port", str(port)]
    if adapters:
        modules, ranks = [], []
        for name, folder in adapters.items():
            adapter_path, rank = _lora_adapter(name, folder, served_name)
            modules.append(f"{name}={adapter_path}")
            ranks.append(rank)
        argv += ["--enable-lora", "--max-loras", str(len(modules)), "--max-lora-rank", str(_vllm_rank(max(ranks))),
                 "--lora-modules", *modules]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    argv += extra
    env = {API_KEY_ENV: api_key} if api_key else {}
    return VllmLaunch(argv=argv, env=env)


def format_command(launch: VllmLaunch) -> str:
    """`launch` as one shell line to read or paste: argv shell-quoted, environment variables in front, the
    API key shown as ``$VLLM_API_KEY`` (never its value)."""
    prefix = [f"{k}=${k}" if k == API_KEY_ENV else f"{k}={shlex.quote(v)}" for k, v in launch.env.items()]
    return " ".join([*prefix, shlex.join(launch.argv)])


def _model_path(path: str) -> str:
    """The absolute model folder vLLM should load, after checking it is a Hugging Face model folder."""
    from slmops.engines import engine_kind

    p = Path(path).expanduser()
    if not p.exists():
        from slmops.models.load import is_hub_id

        if is_hub_id(str(path)):
            return str(path)  # vLLM downloads hub models itself
        raise NotFoundError(f"no model folder {path}", "pass a Hugging Face model folder (config.json inside)")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        kind = "adapter"
    elif p.is_file() and p.suffix != ".gguf":
        raise BadInputError(f"{p} is a file, not a model folder",
                            "vLLM serves Hugging Face model folders (config.json and weights inside)")
    else:
        kind = engine_kind(p)  # raises for a folder that holds no model
    if kind == "torch":
        return str(p.resolve())
    if kind == "adapter":
        raise BadInputError(
            f"{p} is a LoRA adapter folder, not a model",
            f"serve its base model with the adapter on top: slmops serve BASE_FOLDER=NAME --adapter ADAPTER={path} "
            "--engine vllm",
        )
    what = {"llama.cpp": "a GGUF model (llama.cpp)", "ort-genai": "an ONNX Runtime GenAI model"}.get(kind, kind)
    raise BadInputError(
        f"{p} is {what}; vLLM (--engine vllm) serves Hugging Face model folders (config.json) only",
        f"serve it with slmops's own server: `slmops serve {path}` (without --engine vllm), or give vLLM the "
        "Hugging Face folder it was exported from (`slmops models lineage` shows it)",
    )


def _lora_adapter(name: str, folder: str, served_name: str) -> tuple[str, int]:
    """(absolute folder, LoRA rank r) of a PEFT LoRA adapter folder, after checking it and its name."""
    from slmops.adapters.core import check_adapter_name, read_adapter

    check_adapter_name(name)
    if name == served_name:
        raise BadInputError(f"adapter name {name!r} is also the served model's name",
                            "clients pick an adapter by putting its name in `model`: give it another name")
    p = Path(folder).expanduser()
    if p.is_file():
        raise BadInputError(f"adapter {name!r} is a file ({p}); vLLM loads PEFT LoRA folders",
                            "pass the adapter folder `slmops finetune --method lora` wrote (adapter_config.json "
                            "inside); GGUF LoRA files are served by `slmops serve` without --engine vllm")
    info = read_adapter(p)
    if info.peft_type != "LORA":
        raise BadInputError(f"adapter {name!r} ({p}) is a {info.peft_type} adapter; vLLM serves LoRA adapters only")
    rank = info.config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BadInputError(f"adapter {name!r}: {p / 'adapter_config.json'} has no valid LoRA rank `r` "
                            f"(got {rank!r})")
    path = str(info.path)
    if "=" in path:
        raise BadInputError(f"adapter folder {path} has '=' in its path, which vLLM's --lora-modules "
                            "NAME=PATH cannot read", "move or link the folder to a path without '='")
    return path, rank


def _vllm_rank(r: int) -> int:
    for allowed in LORA_RANKS:
        if r <= allowed:
            return allowed
    raise BadInputError(f"LoRA rank {r} is above the largest rank vLLM serves ({LORA_RANKS[-1]})")


__all__ = ["API_KEY_ENV", "LORA_RANKS", "VllmLaunch", "format_command", "vllm_available", "vllm_command"]

"""Adapter folders: what they are, which base they belong to, and attaching them to a model with checks.

An adapter folder is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``.bin``), plus, when slmops made or registered it, ``training.json``
(the fine-tuning report) and/or ``slmops.json`` (the artifact manifest, whose parents name the base model).

Nothing here imports torch or PEFT at module level.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, NotFoundError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_REPORT = "training.json"
MANIFEST = "slmops.json"
# config fields that must agree between the model an adapter was trained on and the base it is applied to
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_adapter_folder(path: str | Path) -> bool:
    """True when `path` is a folder holding a PEFT ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself."""

    path: Path
    config: dict[str, Any]  # adapter_config.json
    method: str | None = None  # "lora", "qlora", ... (training.json / slmops.json), None when not recorded
    manifest: dict[str, Any] | None = None  # slmops.json when present
    training: dict[str, Any] | None = None  # training.json when present
    notes: list[str] = field(default_factory=list)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type") or "LORA").upper()

    @property
    def base_model_name_or_path(self) -> str | None:
        v = self.config.get("base_model_name_or_path")
        return str(v) if v else None

    @property
    def is_qlora(self) -> bool:
        return (self.method or "").lower() == "qlora"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else None


def _method_from(*docs: dict[str, Any] | None) -> str | None:
    """The training method recorded in any of `docs` (top level, or under "config" / "slmops")."""
    for doc in docs:
        if not doc:
            continue
        for scope in (doc, doc.get("config"), doc.get("slmops")):
            if isinstance(scope, dict):
                for key in ("method", "finetune_method"):
                    if isinstance(scope.get(key), str):
                        return scope[key].lower()
                if scope.get("quantization") in ("nf4", "int4", "4bit", "qint4") or scope.get("load_in_4bit") is True:
                    return "qlora"
    return None


def read_adapter(path: str | Path) -> AdapterInfo:
    """Read an adapter folder; raise a clear error when `path` is not one."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise NotFoundError(f"no such adapter folder: {folder}")
    if not folder.is_dir():
        raise BadInputError(f"expected an adapter folder, got a file: {folder}",
                            "pass the folder PEFT's save_pretrained (or `slmops finetune --method lora`) wrote")
    config = _read_json(folder / ADAPTER_CONFIG)
    if config is None:
        hint = ("this looks like a full model folder: use it as a model, not an adapter"
                if (folder / "config.json").is_file() else
                "an adapter folder holds adapter_config.json and adapter_model.safetensors (PEFT's save_pretrained)")
        raise BadInputError(f"{folder} is not an adapter folder: no {ADAPTER_CONFIG}", hint)
    if not any((folder / w).is_file() for w in ADAPTER_WEIGHTS):
        raise BadInputError(f"adapter folder {folder} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    manifest = _read_json(folder / MANIFEST)
    training = _read_json(folder / TRAINING_REPORT)
    return AdapterInfo(path=folder.resolve(), config=config, method=_method_from(training, manifest, config),
                       manifest=manifest, training=training)


# ------------------------------------------------------------------------------------------ base model


def resolve_ref(ref: str | Path, workspace=None) -> tuple[str, str | None]:
    """(local folder or hub id, registered artifact id or None) for a model or adapter reference."""
    ref_s = str(ref)
    if workspace is not None:
        try:
            folder = workspace.resolve(ref_s)
        except NotFoundError:
            return ref_s, None
        art_id = None
        if (folder / MANIFEST).is_file():
            try:
                art_id = workspace.artifact_id(folder)
            except Exception:  # an unreadable manifest: still usable as a plain folder
                art_id = None
            if art_id is not None and workspace.registry.get(art_id) is None:
                art_id = None
        return str(folder), art_id
    path = Path(ref_s).expanduser()
    return (str(path.resolve()) if path.exists() else ref_s), None


def find_base(adapter: AdapterInfo, workspace=None) -> str | None:
    """The base model an adapter was trained on, as a loadable reference (folder, artifact id, hub id), or
    None when the adapter does not say.

    Looked up in order: the adapter artifact's ``model`` parent (with a `workspace`), ``base_model`` /
    ``model`` in training.json, and ``base_model_name_or_path`` in adapter_config.json (a relative path is
    tried against the adapter folder, its parent and the current directory).
    """
    if workspace is not None and adapter.manifest:
        for parent in adapter.manifest.get("parents") or []:
            row = workspace.registry.get(parent)
            if row is not None and row["kind"] == "model":
                return parent
    candidates: list[str] = []
    if adapter.training:
        for scope in (adapter.training, adapter.training.get("config")):
            if isinstance(scope, dict):
                for key in ("base_model", "model"):
                    if isinstance(scope.get(key), str):
                        candidates.append(scope[key])
    if adapter.base_model_name_or_path:
        candidates.append(adapter.base_model_name_or_path)
    for cand in candidates:
        found = _locate(cand, adapter.path, workspace)
        if found is not None:
            return found
    from slmops.models.load import is_hub_id

    for cand in candidates:
        if is_hub_id(cand):
            return cand
    return None


def _locate(ref: str, adapter_dir: Path, workspace) -> str | None:
    if workspace is not None and workspace.registry.lookup(ref) is not None:
        return ref
    p = Path(ref).expanduser()
    tries = [p] if p.is_absolute() else [adapter_dir / p, adapter_dir.parent / p, Path.cwd() / p]
    for t in tries:
        if (t / "config.json").is_file():
            return str(t.resolve())
    return None


def require_base(adapter: AdapterInfo, base: str | None, workspace=None) -> str:
    """`base` if given, else the adapter's own base (see :func:`find_base`); a clear error when neither."""
    if base is not None:
        return base
    found = find_base(adapter, workspace)
    if found is None:
        raise BadInputError(
            f"adapter {adapter.path} does not say which base model it belongs to "
            f"(base_model_name_or_path is {adapter.base_model_name_or_path!r})",
            "pass the base model explicitly (--base MODEL)",
        )
    return found


def check_base_config(adapter: AdapterInfo, base_config: Any, workspace=None) -> None:
    """Refuse when the model the adapter was trained on is known and its architecture differs from
    `base_config`'s (model type, widths, layers, heads). Unknown origin: nothing to compare, no error."""
    origin = find_base(adapter, workspace)
    if origin is None:
        return
    folder: Path | None = None
    if workspace is not None and workspace.registry.lookup(origin) is not None:
        folder = Path(workspace.registry.lookup(origin))
    elif Path(origin).is_dir():
        folder = Path(origin)
    if folder is None or not (folder / "config.json").is_file():
        return
    try:
        trained_on = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    diffs = []
    for key in SHAPE_FIELDS:
        want = trained_on.get(key)
        have = getattr(base_config if key == "model_type" else text, key, None)
        if want is not None and have is not None and want != have:
            diffs.append(f"{key} {want} (adapter's base) vs {have}")
    if diffs:
        raise BadInputError(
            f"adapter {adapter.path} was trained on {origin}, whose architecture differs from this base: "
            + "; ".join(diffs),
            f"apply it to {origin} (or a model of the same architecture), or leave out --base to use its own base",
        )


# ------------------------------------------------------------------------------------------ attaching


def check_adapter_name(name: str) -> str:
    from slmops.engines.base import BASE_ADAPTER

    if not isinstance(name, str) or not _NAME.match(name):
        raise BadInputError(f"invalid adapter name {name!r}",
                            "use letters, digits, '_', '-' or '.' (at most 64 characters)")
    if name == BASE_ADAPTER:
        raise BadInputError(f"{BASE_ADAPTER!r} is reserved (it asks for the base model without adapters)",
                            "choose another adapter name")
    return name


def _saved_keys(folder: Path) -> set[str]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return set(f.keys())
    import torch

    return set(torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True))


def attach_adapter(model, adapter: AdapterInfo, name: str, peft_model=None, workspace=None):
    """Load `adapter` into `model` under `name`; returns the PeftModel (`peft_model`, or a new one that wraps
    `model` in place). The model's forward then runs with the active adapter.

    Refuses, with a hint, adapters whose base architecture or weight shapes do not match `model`, and
    prompt-learning adapters (only adapters that change layers, such as LoRA, can be switched and merged).
    """
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict

    try:
        cfg = PeftConfig.from_pretrained(str(adapter.path))
    except Exception as e:  # noqa: BLE001 - peft raises ValueError/TypeError/KeyError for unknown configs
        raise BadInputError(f"cannot read {adapter.path / ADAPTER_CONFIG}: {e}") from e
    if cfg.is_prompt_learning:
        raise BadInputError(f"adapter {adapter.path} is a {cfg.peft_type} (prompt-learning) adapter",
                            "only layer adapters such as LoRA can be served side by side or merged")
    check_base_config(adapter, model.config, workspace)
    try:
        with warnings.catch_warnings():  # checked below, with a clearer message
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        if peft_model is None:
            _strip_tuner_layers(model)  # from_pretrained wrapped `model` in place before it failed
        else:
            _detach(peft_model, name)
        raise _mismatch(adapter, e) from e
    loaded = set(get_peft_model_state_dict(peft_model, adapter_name=name))
    saved = _saved_keys(adapter.path)
    missing, unexpected = sorted(loaded - saved), sorted(saved - loaded)
    if missing or unexpected:
        if len(peft_model.peft_config) == 1:
            peft_model.unload()  # the model as it was
        else:
            _detach(peft_model, name)
        what = []
        if unexpected:
            what.append(f"{len(unexpected)} adapter weights have no place in this base (e.g. {unexpected[0]})")
        if missing:
            what.append(f"{len(missing)} of this base's adapted layers have no weights (e.g. {missing[0]})")
        raise BadInputError(
            f"adapter {adapter.path} does not fit this base model: " + "; ".join(what),
            "the adapter was trained on a model with different layers; apply it to the base it was trained on",
        )
    return peft_model


def _detach(peft_model, name: str) -> None:
    if name not in getattr(peft_model, "peft_config", {}):
        return
    try:
        peft_model.delete_adapter(name)
    except Exception:  # noqa: BLE001 - best effort: the caller raises the real problem
        log.debug("could not remove adapter %s after a failed load", name, exc_info=True)


def _strip_tuner_layers(model) -> None:
    """Put back the original modules where PEFT wrapped them (after a failed first load)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for key, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not key:
            continue
        parent_key, _, child = key.rpartition(".")
        try:
            parent = model.get_submodule(parent_key) if parent_key else model
        except AttributeError:
            continue
        if getattr(parent, child, None) is module:
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        try:
            del model.peft_config
        except AttributeError:
            pass


def _mismatch(adapter: AdapterInfo, e: Exception) -> BadInputError:
    text = str(e)
    if "size mismatch" in text:
        first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln), text)
        return BadInputError(
            f"adapter {adapter.path} does not fit this base model (weight shapes differ): {first[:300]}",
            "the adapter was trained on a model of another size; apply it to the base it was trained on "
            f"({adapter.base_model_name_or_path or 'see its slmops.json parents'})",
        )
    if "Target modules" in text or "not found in the base model" in text:
        return BadInputError(
            f"adapter {adapter.path} targets layers this base model does not have: {text[:300]}",
            "apply it to a model of the architecture it was trained on",
        )
    return BadInputError(f"cannot load adapter {adapter.path}: {text[:500]}")


__all__ = [
    "ADAPTER_CONFIG",
    "AdapterInfo",
    "attach_adapter",
    "check_adapter_name",
    "check_base_config",
    "find_base",
    "is_adapter_folder",
    "read_adapter",
    "require_base",
    "resolve_ref",
]

"""Bundles: per device profile, one versioned folder a device can verify, test and serve on its own.

Layout of ``OUT/<version>/<profile>/``::

    model/              the variant's files (a Hugging Face folder, an ONNX GenAI folder, or model.gguf)
    model/inference_model.json   Foundry Local descriptor (ONNX variants; kept if the export had one)
    Modelfile           Ollama descriptor (GGUF variants; FROM ./model/model.gguf)
    serve.json          name, engine, engine options, max context, format, precision, how to serve it
    smoke/smoke.jsonl   the smoke test records (last message = reference answer)
    smoke/smoke.json    the smoke test settings: data file, gates, max_new_tokens
    bundle.json         the manifest: version, profile, variant, and the sha256 and size of every other file

The sha256 of ``bundle.json`` itself is what a channel file pins (see :mod:`slmops.rollout.channel`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, IntegrityError, NotFoundError, SlmopsError
from slmops.rollout.blueprint import Blueprint, ProfileSpec, load_blueprint, read_smoke_records
from slmops.rollout.util import check_version, dumps, safe_relpath, sha256_bytes, utc_now, write_atomic

log = logging.getLogger(__name__)

BUNDLE_MANIFEST = "bundle.json"
SERVE_FILE = "serve.json"
SMOKE_FILE = "smoke/smoke.json"
SMOKE_DATA = "smoke/smoke.jsonl"
MODEL_DIR = "model"
BUNDLE_SCHEMA = 1


@dataclass
class BundleResult:
    profile: str
    version: str
    path: Path
    bundle_sha256: str
    files: int
    size_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "version": self.version, "path": str(self.path),
                "bundle_sha256": self.bundle_sha256, "files": self.files, "size_bytes": self.size_bytes,
                "notes": self.notes}


def _resolve_variant(bp: Blueprint, ref: str, workspace) -> Path:
    p = bp.path(ref)
    if p.exists():
        return p.resolve()
    if workspace is not None:
        try:
            return Path(workspace.resolve(ref))
        except NotFoundError:
            pass
    raise NotFoundError(f"variant model {ref!r} is neither a path (looked at {p}) nor a workspace artifact",
                        "give a folder or file relative to the blueprint, or an artifact id / alias (-w WORKSPACE)")


def _check_format(src: Path, fmt: str) -> None:
    ok = {
        "hf": src.is_dir() and (src / "config.json").is_file(),
        "onnx": src.is_dir() and (src / "genai_config.json").is_file(),
        "gguf": (src.is_file() and src.suffix == ".gguf") or (src.is_dir() and (src / "model.gguf").is_file()),
    }[fmt]
    if not ok:
        what = {"hf": "a Hugging Face folder with config.json", "onnx": "an ONNX GenAI folder with genai_config.json",
                "gguf": "a .gguf file or a GGUF export folder with model.gguf"}[fmt]
        raise BadInputError(f"variant {src} is not format {fmt!r}: expected {what}", "fix variant.format or variant.model")


def _copy_variant(src: Path, dest: Path, fmt: str) -> None:
    if src.is_file():
        dest.mkdir(parents=True)
        shutil.copy2(src, dest / "model.gguf")
        return
    shutil.copytree(src, dest, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.partial", ".*.tmp"))


def _chat_template(folder: Path) -> tuple[str | None, str, str]:
    cfg_p = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_p.read_text(encoding="utf-8")) if cfg_p.is_file() else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")

    def tok(v: Any) -> str:
        return str(v.get("content") or "") if isinstance(v, dict) else str(v or "")

    return template, tok(cfg.get("bos_token")), tok(cfg.get("eos_token"))


def _descriptors(bundle: Path, fmt: str, name: str, version: str, max_context: int) -> list[str]:
    """Foundry Local inference_model.json (ONNX) / Ollama Modelfile (GGUF). Returns notes on what was done."""
    notes = []
    model = bundle / MODEL_DIR
    if fmt == "onnx":
        if (model / "inference_model.json").is_file():
            notes.append("kept the export's inference_model.json")
        else:
            try:
                from slmops.export.foundry import INFERENCE_MODEL, inference_model_json

                template, bos, eos = _chat_template(model)
                if not template:
                    raise BadInputError("the model has no chat template")
                genai = json.loads((model / "genai_config.json").read_text(encoding="utf-8"))
                desc = inference_model_json(template, name=name, version=version, bos_token=bos, eos_token=eos,
                                            genai_config=genai)
                write_atomic(model / INFERENCE_MODEL, dumps(desc))
                notes.append("wrote model/inference_model.json (Foundry Local)")
            except (SlmopsError, OSError, ValueError) as exc:
                notes.append(f"no inference_model.json: {getattr(exc, 'message', exc)}")
    elif fmt == "gguf":
        existing = [p for p in model.glob("*Modelfile")]
        if existing:
            notes.append(f"kept the export's {existing[0].name} (in model/)")
        try:
            from slmops.export.gguf import write_modelfile

            template, bos, eos = _chat_template(model)
            if not template:
                from slmops.export.llamacpp import read_gguf_metadata

                template = read_gguf_metadata(model / "model.gguf", ("tokenizer.chat_template",)).get(
                    "tokenizer.chat_template")
            if not template:
                raise BadInputError("the GGUF file has no chat template")
            write_modelfile(model / "model.gguf", template, bundle / "Modelfile", from_path=f"./{MODEL_DIR}/model.gguf",
                            bos_token=bos or None, eos_token=eos or None, parameters={"num_ctx": max_context})
            notes.append("wrote Modelfile (Ollama)")
        except (SlmopsError, OSError, ValueError, ImportError) as exc:
            notes.append(f"no Modelfile: {getattr(exc, 'message', exc)}")
    return notes


def hash_bundle_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "size"}} for every file under `folder` except bundle.json."""
    from slmops.workspace import sha256_file

    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise BadInputError(f"{p} is a symbolic link; bundles hold plain files only")
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != BUNDLE_MANIFEST:
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def build_profile_bundle(bp: Blueprint, profile: str, spec: ProfileSpec, version: str, out_dir: Path, *,
                         workspace=None, force: bool = False) -> BundleResult:
    """Build ``out_dir/<version>/<profile>/`` atomically (a temporary folder renamed at the end)."""
    check_version(version)
    dest = out_dir / version / profile
    if dest.exists() and not force:
        raise BadInputError(f"bundle {dest} already exists", "bundles are immutable: pick a new --version, or --force")
    src = _resolve_variant(bp, spec.variant.model, workspace)
    _check_format(src, spec.variant.format)
    name = spec.serve_name or bp.name
    tmp = out_dir / version / f".{profile}.{uuid.uuid4().hex[:8]}.partial"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        _copy_variant(src, tmp / MODEL_DIR, spec.variant.format)
        notes = [n.replace(str(tmp), str(dest)) for n in
                 _descriptors(tmp, spec.variant.format, name, version, spec.variant.max_context)]
        # smoke test
        smoke_src = bp.path(spec.smoke.data)
        records = read_smoke_records(smoke_src, spec.smoke.limit)
        (tmp / "smoke").mkdir()
        (tmp / SMOKE_DATA).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                      encoding="utf-8")
        smoke = {"data": Path(SMOKE_DATA).name, "gate": list(spec.smoke.gate),
                 "max_new_tokens": spec.smoke.max_new_tokens, "records": len(records)}
        write_atomic(tmp / SMOKE_FILE, dumps(smoke))
        v = spec.variant
        serve = {"name": name, "model": MODEL_DIR, "format": v.format, "precision": v.precision, "engine": v.engine,
                 "engine_options": dict(v.engine_options), "max_context": v.max_context}
        write_atomic(tmp / SERVE_FILE, dumps(serve))
        files = hash_bundle_files(tmp)
        source_id = None
        manifest_p = src / "slmops.json" if src.is_dir() else None
        if manifest_p is not None and manifest_p.is_file():
            source_id = json.loads(manifest_p.read_text(encoding="utf-8")).get("id")
        manifest = {
            "schema": BUNDLE_SCHEMA, "version": version, "profile": profile, "name": name, "created": utc_now(),
            "description": spec.description,
            "variant": {"source": spec.variant.model, "source_artifact": source_id, "format": v.format,
                        "precision": v.precision, "engine": v.engine, "max_context": v.max_context},
            "model": MODEL_DIR, "serve": SERVE_FILE, "smoke": SMOKE_FILE, "notes": notes,
            "files": files, "size_bytes": sum(f["size"] for f in files.values()),
        }
        data = dumps(manifest)
        write_atomic(tmp / BUNDLE_MANIFEST, data)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return BundleResult(profile, version, dest, sha256_bytes(data), len(files) + 1,
                        manifest["size_bytes"] + len(data), notes)


def build_bundles(blueprint: Blueprint | str | Path, version: str, out_dir: str | Path, *, workspace=None,
                  profiles: list[str] | None = None, force: bool = False) -> list[BundleResult]:
    """Build one bundle per profile of `blueprint` under ``out_dir/<version>/``; returns them in blueprint order."""
    bp = blueprint if isinstance(blueprint, Blueprint) else load_blueprint(blueprint)
    check_version(version)
    unknown = [p for p in (profiles or []) if p not in bp.profiles]
    if unknown:
        raise BadInputError(f"no profile {', '.join(map(repr, unknown))} in the blueprint",
                            "profiles: " + ", ".join(bp.profiles))
    out = Path(out_dir)
    return [build_profile_bundle(bp, name, spec, version, out, workspace=workspace, force=force)
            for name, spec in bp.profiles.items() if not profiles or name in profiles]


def read_manifest(bundle: Path) -> dict[str, Any]:
    p = bundle / BUNDLE_MANIFEST
    if not p.is_file():
        raise NotFoundError(f"{bundle} is not a bundle: no {BUNDLE_MANIFEST}", "build one with `slmops bundle`")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{p} is not valid JSON: {exc}") from None


def verify_bundle_dir(bundle: Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Check a bundle folder: bundle.json against `expected_sha256` (when given), every listed file's size
    and sha256, and no file that the manifest does not list. Returns the manifest; IntegrityError otherwise."""
    from slmops.workspace import sha256_file

    raw = (bundle / BUNDLE_MANIFEST).read_bytes() if (bundle / BUNDLE_MANIFEST).is_file() else None
    if raw is None:
        raise IntegrityError(f"{bundle} has no {BUNDLE_MANIFEST}")
    if expected_sha256 and sha256_bytes(raw) != expected_sha256:
        raise IntegrityError(f"{bundle}/{BUNDLE_MANIFEST}: sha256 {sha256_bytes(raw)[:12]}... does not match "
                             f"the expected {expected_sha256[:12]}...")
    manifest = json.loads(raw)
    problems = []
    listed = set()
    for rel, meta in manifest.get("files", {}).items():
        rel = safe_relpath(rel)
        listed.add(rel)
        p = bundle / rel
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif p.stat().st_size != meta.get("size", p.stat().st_size) or sha256_file(p) != meta.get("sha256"):
            problems.append(f"changed {rel}")
    for p in bundle.rglob("*"):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and rel != BUNDLE_MANIFEST and rel not in listed:
            problems.append(f"unexpected {rel}")
    if problems:
        raise IntegrityError(f"bundle {bundle} does not match its manifest: " + "; ".join(problems))
    return manifest


__all__ = ["BUNDLE_MANIFEST", "BundleResult", "build_bundles", "build_profile_bundle", "hash_bundle_files",
           "read_manifest", "verify_bundle_dir"]

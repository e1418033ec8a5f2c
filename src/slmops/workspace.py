"""The workspace: artifacts written atomically, each with its manifest `slmops.json`.

An artifact is a folder under ``<workspace>/artifacts/<id>/`` holding its files and ``slmops.json``: kind,
id, name, sha256 of every file, the resolved config that produced it, parent artifact ids, metrics,
library versions and created time. Folders are the truth; the SQLite registry (``registry.sqlite``) is an
index that ``rebuild`` recreates from them.

Writes are atomic: files go into ``<workspace>/tmp/<id>.partial``; the manifest is written last, then the
folder is renamed into ``artifacts/``. A crash leaves only a ``.partial`` folder, which is never listed,
never resolved and cleaned by ``Workspace.clean_partials``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import BadInputError, IntegrityError, NotFoundError

MANIFEST = "slmops.json"
SCHEMA_VERSION = 1
KINDS = ("dataset", "model", "adapter", "export", "eval", "bench", "report", "bundle")
_LIBS = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "datasets", "onnxruntime",
         "onnxruntime_genai", "gguf", "llama_cpp")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative posix path -> hex), except the manifest."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST:
            out[rel] = sha256_file(p)
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reproducing an artifact (only those installed)."""
    from importlib import metadata

    names = {"onnxruntime_genai": "onnxruntime-genai", "llama_cpp": "llama-cpp-python"}
    out = {"python": platform.python_version()}
    for lib in ("slmops", *_LIBS):
        try:
            out[lib] = metadata.version(names.get(lib, lib))
        except metadata.PackageNotFoundError:
            continue
    return out


def new_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class Manifest:
    """The contents of `slmops.json`."""

    id: str
    kind: str
    name: str
    files: dict[str, str]
    config: dict[str, Any] = field(default_factory=dict)
    parents: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=False, default=str) + "\n"

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.exists():
            raise NotFoundError(f"{folder} has no {MANIFEST}: it is not an slmops artifact")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise IntegrityError(f"{path} is not a valid manifest: {exc}") from exc


@dataclass
class VerifyResult:
    id: str
    ok: bool
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.ok:
            return f"{self.id}: ok"
        parts = [f"changed: {', '.join(self.changed)}" if self.changed else "",
                 f"missing: {', '.join(self.missing)}" if self.missing else "",
                 f"unexpected: {', '.join(self.extra)}" if self.extra else ""]
        return f"{self.id}: " + "; ".join(p for p in parts if p)


class ArtifactWriter:
    """Handed out by `Workspace.create_artifact`; write files into `.path`, set metrics/config."""

    def __init__(self, path: Path, id: str, kind: str, name: str, config: dict, parents: list[str],
                 metrics: dict):
        self.path = path
        self.id = id
        self.kind = kind
        self.name = name
        self.config = config
        self.parents = parents
        self.metrics = metrics


class Workspace:
    """A folder holding artifacts and the registry."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.artifacts_dir = self.root / "artifacts"
        self.tmp_dir = self.root / "tmp"
        self._registry = None

    @property
    def registry(self):
        from slmops.registry import Registry

        if self._registry is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._registry = Registry(self.root / "registry.sqlite")
        return self._registry

    # --- writing ---------------------------------------------------------------------------------
    @contextmanager
    def create_artifact(
        self,
        kind: str,
        name: str | None = None,
        *,
        config: dict | None = None,
        parents: list[str] | None = None,
        metrics: dict | None = None,
        id: str | None = None,
    ) -> Iterator[ArtifactWriter]:
        """Write an artifact atomically. Files go into `writer.path`; on success the manifest is written
        last and the folder renamed into place, then indexed. On any exception the partial folder is
        removed and nothing is registered."""
        if kind not in KINDS:
            raise BadInputError(f"unknown artifact kind {kind!r}", f"use one of {', '.join(KINDS)}")
        art_id = id or new_id(kind)
        for parent in parents or []:
            if self.registry.get(parent) is None:
                raise NotFoundError(f"parent artifact {parent!r} is not in the registry")
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        final = self.artifacts_dir / art_id
        if final.exists():
            raise BadInputError(f"artifact {art_id} already exists at {final}")
        partial = self.tmp_dir / f"{art_id}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        writer = ArtifactWriter(partial, art_id, kind, name or art_id, dict(config or {}), list(parents or []),
                                dict(metrics or {}))
        try:
            yield writer
            manifest = Manifest(
                id=art_id, kind=kind, name=writer.name, files=hash_folder(partial), config=writer.config,
                parents=writer.parents, metrics=writer.metrics, libraries=library_versions(),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            _write_atomic(partial / MANIFEST, manifest.to_json())
            _fsync_dir(partial)
            os.replace(partial, final)
            _fsync_dir(self.artifacts_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self.registry.index(manifest, final)

    def import_folder(self, src: str | Path, kind: str, name: str | None = None, **kw: Any) -> Manifest:
        """Copy an existing folder (e.g. a Hugging Face model folder) into the workspace as an artifact."""
        src = Path(src)
        if not src.is_dir():
            raise NotFoundError(f"folder not found: {src}")
        with self.create_artifact(kind, name, **kw) as w:
            for p in src.iterdir():
                if p.name == MANIFEST:
                    continue
                dst = w.path / p.name
                shutil.copytree(p, dst) if p.is_dir() else shutil.copy2(p, dst)
            art_id = w.id
        return self.manifest(art_id)

    def update_metrics(self, ref: str, metrics: dict[str, Any]) -> Manifest:
        """Merge `metrics` into an artifact's manifest (atomically) and re-index it."""
        folder = self.resolve(ref)
        m = Manifest.read(folder)
        m.metrics.update(metrics)
        _write_atomic(folder / MANIFEST, m.to_json())
        self.registry.index(m, folder)
        return m

    # --- reading ---------------------------------------------------------------------------------
    def resolve(self, ref: str | Path) -> Path:
        """The folder of an artifact given by id, alias (`name@alias` or alias) or path."""
        ref_s = str(ref)
        hit = self.registry.lookup(ref_s)
        if hit is not None:
            folder = Path(hit)
            if not (folder / MANIFEST).exists():
                raise IntegrityError(f"artifact {ref_s} is registered at {folder} but its folder is gone",
                                     "run `slmops registry rebuild`")
            return folder
        path = Path(ref_s).expanduser()
        if path.exists():
            return path.resolve()
        known = [r["id"] for r in self.registry.list()[:10]]
        raise NotFoundError(
            f"no artifact, alias or path {ref_s!r}",
            "see `slmops models list`" + (f"; recent: {', '.join(known)}" if known else ""),
        )

    def manifest(self, ref: str | Path) -> Manifest:
        return Manifest.read(self.resolve(ref))

    def artifact_id(self, ref: str | Path) -> str | None:
        """The artifact id behind `ref`, or None if `ref` is a plain path outside the registry."""
        folder = self.resolve(ref)
        if (folder / MANIFEST).exists():
            return Manifest.read(folder).id
        return None

    def verify(self, ref: str) -> VerifyResult:
        """Re-hash an artifact's files and compare with its manifest."""
        folder = self.resolve(ref)
        m = Manifest.read(folder)
        actual = hash_folder(folder)
        changed = [f for f, h in m.files.items() if f in actual and actual[f] != h]
        missing = [f for f in m.files if f not in actual]
        extra = [f for f in actual if f not in m.files]
        return VerifyResult(m.id, not (changed or missing or extra), changed, missing, extra)

    def rebuild_registry(self) -> int:
        """Re-index every complete artifact folder (partials are ignored); returns how many."""
        self.registry.clear_artifacts()
        n = 0
        if self.artifacts_dir.exists():
            for folder in sorted(self.artifacts_dir.iterdir()):
                if (folder / MANIFEST).exists():
                    self.registry.index(Manifest.read(folder), folder)
                    n += 1
        return n

    def remove(self, ref: str) -> str:
        folder = self.resolve(ref)
        m = Manifest.read(folder)
        children = self.registry.children(m.id)
        if children:
            raise BadInputError(f"{m.id} has children: {', '.join(children)}", "remove them first")
        self.registry.delete(m.id)
        if folder.parent == self.artifacts_dir:
            shutil.rmtree(folder)
        return m.id

    def clean_partials(self) -> int:
        n = 0
        if self.tmp_dir.exists():
            for p in self.tmp_dir.glob("*.partial"):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

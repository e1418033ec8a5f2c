"""The static channel index: plain files any web server, object store or CDN can host.

Layout of an index folder::

    bundles/<version>/<profile>/...     bundles copied by `slmops rollout publish` (immutable once published)
    channels/<channel>.json             one file per channel, replaced atomically on every change

A channel file::

    {"schema": 1, "channel": "stable", "state": "active",          # or "halted"
     "percent": 10.0,                                             # share of devices on `current`
     "current":  {"version": "v2", "published": "...Z",
                  "bundles": {"cpu-avx2-8gb": {"url": "bundles/v2/cpu-avx2-8gb/", "bundle_sha256": "...",
                                               "size_bytes": 123}}},
     "previous": {...same shape...} or null,                     # what devices outside the percentage run
     "withdrawn": ["v3"],                                        # versions rolled back from this channel
     "updated": "...Z", "bucket": "<the function below>", "history": [{"time", "action", ...}]}

Which devices are in the rollout is decided by each device, from :func:`bucket`:

    bucket(channel, device_id) = int(sha256(f"{channel}:{device_id}").hexdigest()[:8], 16) % 10000
    in_rollout                 = bucket < round(percent * 100)

The version is deliberately *not* hashed: a device's bucket is fixed per channel, so the stages of a rollout
are nested (inside 10% => inside 50% => inside 100%) and no device flips back and forth between stages.
The price is that the same devices are the first to get every version of a channel (stable canaries);
use a separate channel (e.g. ``canary``) to choose other devices.

Agents target ``current`` when the channel is active and they are inside the percentage, else
``previous`` (when there is one); a halted channel sends every device to ``previous``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from slmops.errors import BadInputError, GateFailedError, IntegrityError, NotFoundError, SlmopsError
from slmops.rollout.bundle import BUNDLE_MANIFEST, read_manifest, verify_bundle_dir
from slmops.rollout.util import (
    check_version,
    dumps,
    join_ref,
    read_bytes,
    sha256_bytes,
    utc_now,
    write_atomic,
)

CHANNEL_SCHEMA = 1
BUCKETS = 10000
BUCKET_FUNCTION = 'int(sha256(f"{channel}:{device_id}").hexdigest()[:8], 16) % 10000 < round(percent * 100)'
CHANNEL_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def bucket(channel: str, device_id: str) -> int:
    """The device's fixed bucket in 0..9999 for `channel` (see the module docstring)."""
    return int(hashlib.sha256(f"{channel}:{device_id}".encode()).hexdigest()[:8], 16) % BUCKETS


def in_rollout(channel: str, device_id: str, percent: float) -> bool:
    """True when the device is inside the first `percent` % of `channel` (nested: inside 10 => inside 50)."""
    return bucket(channel, device_id) < round(float(percent) * 100)


class _Lenient(BaseModel):
    # agents read channel files written by other slmops versions: unknown keys are ignored
    model_config = ConfigDict(extra="ignore")


class BundleRef(_Lenient):
    url: str
    bundle_sha256: str
    size_bytes: int = 0


class Release(_Lenient):
    version: str
    published: str = ""
    bundles: dict[str, BundleRef] = Field(default_factory=dict)


class ChannelFile(_Lenient):
    schema_: int = Field(CHANNEL_SCHEMA, alias="schema")
    channel: str
    state: Literal["active", "halted"] = "active"
    percent: float = Field(100.0, ge=0, le=100)
    current: Release | None = None
    previous: Release | None = None
    withdrawn: list[str] = Field(default_factory=list)
    updated: str = ""
    bucket: str = BUCKET_FUNCTION
    history: list[dict[str, Any]] = Field(default_factory=list)

    def target(self, device_id: str) -> tuple[Release | None, bool]:
        """(the release this device should run, whether it is inside the rollout percentage)."""
        inside = in_rollout(self.channel, device_id, self.percent)
        if self.state == "active" and inside and self.current is not None:
            return self.current, inside
        return self.previous, inside

    def to_json(self) -> bytes:
        return dumps(self.model_dump(by_alias=True, mode="json"))


def _check_channel(channel: str) -> str:
    import re

    if not re.match(CHANNEL_RE, channel or ""):
        raise BadInputError(f"bad channel name {channel!r}", "use letters, digits, '.', '_' or '-', e.g. stable")
    return channel


def _check_percent(percent: float) -> float:
    if not 0 <= percent <= 100:
        raise BadInputError(f"--percent {percent} is not between 0 and 100")
    return float(percent)


def channel_path(index_dir: str | Path, channel: str) -> Path:
    return Path(index_dir) / "channels" / f"{_check_channel(channel)}.json"


def read_channel(index: str | Path, channel: str) -> ChannelFile:
    """The channel file of `index` (a folder or an http(s) URL)."""
    ref = join_ref(index, f"channels/{_check_channel(channel)}.json")
    raw = read_bytes(ref)
    try:
        return ChannelFile.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValueError) as exc:
        raise SlmopsError(f"{ref} is not a valid channel file: {exc}") from None


def _load_local(index_dir: str | Path, channel: str) -> ChannelFile:
    p = channel_path(index_dir, channel)
    if not p.is_file():
        raise NotFoundError(f"no channel {channel!r} in {index_dir}", "publish a version first: slmops rollout publish")
    return read_channel(index_dir, channel)


def _save(index_dir: str | Path, ch: ChannelFile, action: str, **detail: Any) -> ChannelFile:
    ch.updated = utc_now()
    ch.history.append({"time": ch.updated, "action": action, "by": _who(), **detail})
    ch.history = ch.history[-200:]
    write_atomic(channel_path(index_dir, ch.channel), ch.to_json())
    return ch


def _who() -> str:
    import getpass
    import socket

    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


def find_bundles(path: str | Path) -> dict[str, Path]:
    """Profile -> bundle folder, for a bundle folder (holding bundle.json) or a version folder of them."""
    path = Path(path)
    if (path / BUNDLE_MANIFEST).is_file():
        return {read_manifest(path)["profile"]: path}
    found = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []:
        if (sub / BUNDLE_MANIFEST).is_file():
            found[read_manifest(sub)["profile"]] = sub
    if not found:
        raise NotFoundError(f"no bundle in {path}", "pass OUT/<version> as written by `slmops bundle --out OUT`")
    return found


def _copy_bundle(src: Path, dest: Path, sha: str) -> None:
    """Copy a verified bundle into the index (atomic rename); an existing copy must be identical."""
    if dest.exists():
        try:
            verify_bundle_dir(dest, sha)
            return
        except IntegrityError:
            raise IntegrityError(f"{dest} already exists in the index with other content",
                                 "published versions are immutable: bundle under a new --version") from None
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(src, tmp)
        verify_bundle_dir(tmp, sha)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(bundle_dir: str | Path, index_dir: str | Path, channel: str = "stable", percent: float = 10.0) -> ChannelFile:
    """Copy the bundles of one version under ``index_dir/bundles/<version>/<profile>/`` and make that version
    the channel's `current` at `percent` %. The version that was fully rolled out (100 %, active) becomes
    `previous`; a version still in a partial rollout is replaced (its `previous` stays)."""
    _check_channel(channel)
    percent = _check_percent(percent)
    bundles = find_bundles(bundle_dir)
    versions = {read_manifest(p)["version"] for p in bundles.values()}
    if len(versions) != 1:
        raise BadInputError(f"{bundle_dir} holds bundles of several versions: {', '.join(sorted(versions))}",
                            "publish one version at a time")
    version = check_version(versions.pop())
    index = Path(index_dir)
    ch = _load_local(index, channel) if channel_path(index, channel).is_file() else ChannelFile(channel=channel)
    if ch.current is not None and ch.current.version == version:
        raise BadInputError(f"{version} is already the current version of {channel}",
                            f"change its share with: slmops rollout advance --channel {channel} --percent N")
    if version in ch.withdrawn:
        raise BadInputError(f"{version} was rolled back from {channel}", "bundle a fixed model under a new version")
    refs = {}
    for profile, src in bundles.items():
        sha = sha256_bytes((src / BUNDLE_MANIFEST).read_bytes())
        verify_bundle_dir(src, sha)
        rel = f"bundles/{version}/{profile}"
        _copy_bundle(src, index / rel, sha)
        refs[profile] = BundleRef(url=rel + "/", bundle_sha256=sha, size_bytes=read_manifest(src).get("size_bytes", 0))
    release = Release(version=version, published=utc_now(), bundles=refs)
    if ch.current is not None and ch.state == "active" and ch.percent >= 100:
        ch.previous = ch.current
    ch.current = release
    ch.percent = percent
    ch.state = "active"
    return _save(index, ch, "publish", version=version, percent=percent, profiles=sorted(refs))


def stage_failures(ch: ChannelFile, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Failure rate of the current stage: among devices that tried the current version (reports that run it,
    or that recorded a failure of it), the share that failed it."""
    if ch.current is None:
        return {"version": None, "tried": 0, "failed": 0, "rate": 0.0}
    v = ch.current.version
    tried = failed = 0
    for r in reports:
        if r.get("channel") not in (None, ch.channel):
            continue
        failures = r.get("failures") or {}
        if r.get("version") == v:
            tried += 1
        elif v in failures:
            tried += 1
            failed += 1
    return {"version": v, "tried": tried, "failed": failed, "rate": failed / tried if tried else 0.0}


def advance(index_dir: str | Path, channel: str, percent: float, *, reports: list[dict[str, Any]] | None,
            max_failure_rate: float = 0.05, force: bool = False) -> ChannelFile:
    """Raise the current version's share to `percent`. Refused (GateFailedError, exit 3) while the failure
    rate of the current stage (:func:`stage_failures` over agent `reports`) is above `max_failure_rate`;
    `force` skips the check. Resumes a halted channel."""
    percent = _check_percent(percent)
    ch = _load_local(index_dir, channel)
    if ch.current is None:
        raise BadInputError(f"channel {channel} has no current version", "publish one first")
    stats = None
    if not force:
        if reports is None:
            raise BadInputError("advance needs the agents' reports to check the failure rate",
                                "pass --collector DIR (where the agents report), or --force to skip the check")
        stats = stage_failures(ch, reports)
        if stats["rate"] > max_failure_rate:
            raise GateFailedError(
                f"refusing to advance {channel} to {percent:g}%: {stats['failed']} of {stats['tried']} devices "
                f"failed {stats['version']} ({stats['rate']:.1%} > max {max_failure_rate:.1%})",
                f"see `slmops rollout status`; fix and publish a new version, or `slmops rollout rollback --channel {channel}`")
    if percent < ch.percent and not force:
        raise BadInputError(f"{channel} is already at {ch.percent:g}%; advance only raises the share",
                            "use --force to lower it, or `rollout halt` to stop the rollout")
    was = ch.state
    ch.percent = percent
    ch.state = "active"
    return _save(index_dir, ch, "advance", version=ch.current.version, percent=percent, forced=force,
                 resumed=was == "halted", stage=stats)


def halt(index_dir: str | Path, channel: str, reason: str = "") -> ChannelFile:
    """Stop the rollout: every device goes to (or stays on) the previous version; `advance` resumes."""
    ch = _load_local(index_dir, channel)
    ch.state = "halted"
    return _save(index_dir, ch, "halt", version=ch.current.version if ch.current else None, reason=reason)


def rollback(index_dir: str | Path, channel: str, reason: str = "") -> ChannelFile:
    """Point the channel back at the previous version (at 100 %); the current one is withdrawn for good."""
    ch = _load_local(index_dir, channel)
    if ch.previous is None:
        raise SlmopsError(f"channel {channel} has no previous version to roll back to",
                          f"use `slmops rollout halt --channel {channel}` to stop devices taking "
                          f"{ch.current.version if ch.current else 'it'}")
    bad = ch.current.version if ch.current else None
    ch.current, ch.previous = ch.previous, None
    ch.percent = 100.0
    ch.state = "active"
    if bad and bad not in ch.withdrawn:
        ch.withdrawn.append(bad)
    return _save(index_dir, ch, "rollback", version=ch.current.version, withdrawn=bad, reason=reason)


__all__ = ["BUCKET_FUNCTION", "BundleRef", "ChannelFile", "Release", "advance", "bucket", "channel_path",
           "find_bundles", "halt", "in_rollout", "publish", "read_channel", "rollback", "stage_failures"]

"""The device agent: poll a static channel index, take this device's share of a rollout, verify, smoke-test,
switch atomically, serve, roll back by itself, report.

One poll (:meth:`Agent.poll`):

1. read ``channels/<channel>.json`` from the index (an http(s) URL or a folder);
2. pick the target release: ``current`` when the channel is active and the device's bucket is inside the
   percentage (:func:`slmops.rollout.channel.in_rollout`), else ``previous``; a halted channel sends every
   device to ``previous``. No target, or the version it already runs: nothing to do. A version that failed
   its smoke test or readiness check on this device before is remembered and never retried;
3. download the profile's bundle into ``HOME/versions/.<version>.<random>.partial/``: first ``bundle.json``,
   whose sha256 must equal the one in the channel file, then every file it lists, each checked against its
   sha256 and size (paths must stay inside the bundle). Any mismatch: the download is deleted, nothing is
   switched, the report says ``verify_failed`` (retried on the next poll, in case the index is repaired);
   a version already under ``HOME/versions/`` (kept from before) is re-verified instead of downloaded;
4. run the smoke test: open ``model/`` with :func:`slmops.engines.open_engine`, greedy answers for
   ``smoke/smoke.jsonl`` through :func:`slmops.evaluate.runner.evaluate_engine`, the gates of
   ``smoke/smoke.json`` through :func:`slmops.evaluate.gates.check_gates`. A failure deletes the download
   and counts as a rollback (the device stays on what it ran);
5. rename the download to ``HOME/versions/<version>/`` and switch ``HOME/current`` (a relative symlink to
   ``versions/<version>``) by ``os.replace`` of a new symlink: readers see the old or the new target. Older
   versions are kept (the newest `keep_versions`);
6. with ``serve=True``: stop the local ``slmops serve`` (pid in ``HOME/serve.pid``), start it on
   ``HOME/current/model`` and wait for ``GET /ready``; if it is not ready within `ready_timeout`, switch
   ``current`` back, restart the old server, and remember the version as failed (stage ``ready``);
7. write ``HOME/report.json`` and deliver the report to the collector (folder or URL); with a metrics port
   the Prometheus gauges are updated.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import IntegrityError, SlmopsError
from slmops.rollout.bundle import BUNDLE_MANIFEST, verify_bundle_dir
from slmops.rollout.channel import BundleRef, bucket, read_channel
from slmops.rollout.util import (
    check_device_id,
    copy_to,
    dumps,
    join_ref,
    read_bytes,
    safe_relpath,
    sha256_bytes,
    utc_now,
    write_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

FAILED_STATES = ("rolled_back", "verify_failed", "error")


@dataclass
class AgentConfig:
    """What `slmops agent` is given. `serve_command`: the server command line as a template with
    ``{python}``, ``{home}``, ``{model}``, ``{name}``, ``{host}``, ``{port}`` (default: ``python -m slmops serve``)."""

    index: str
    device_id: str
    profile: str
    home: Path
    channel: str = "stable"
    collector: str | None = None
    serve: bool = False
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    ready_timeout: float = 180.0
    serve_command: list[str] | None = None
    keep_versions: int = 3
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


def default_serve_command(serve: dict[str, Any]) -> list[str]:
    cmd = ["{python}", "-m", "slmops", "-q", "-w", "{home}/workspace", "serve", "{model}={name}",
           "--host", "{host}", "--port", "{port}", "--no-access-log"]
    threads = (serve.get("engine_options") or {}).get("threads")
    if threads:
        cmd += ["--threads", str(int(threads))]
    if serve.get("engine") == "vllm":
        cmd += ["--engine", "vllm"]
    return cmd


class LocalServer:
    """The device's `slmops serve` child: started detached (own session) so it outlives an agent restart;
    its pid, version and port are kept in ``HOME/serve.pid``."""

    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.pidfile = cfg.home / "serve.pid"
        self.proc: subprocess.Popen | None = None

    def info(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.pidfile.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        pid = int(data.get("pid", 0))
        if self.proc is not None and self.proc.pid == pid and self.proc.poll() is not None:
            return None
        try:
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        cmdline = Path(f"/proc/{pid}/cmdline")
        if data.get("cmd") and cmdline.exists():  # a stale pid file whose pid now belongs to another program
            try:
                if cmdline.read_bytes().split(b"\0")[:-1] != [c.encode() for c in data["cmd"]]:
                    return None
            except OSError:
                return None
        return data

    def url(self, path: str) -> str:
        return f"http://{self.cfg.serve_host}:{self.cfg.serve_port}{path}"

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url("/ready"), timeout=2) as resp:  # noqa: S310 - loopback
                return resp.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        data = self.info()
        if data is None:
            self.pidfile.unlink(missing_ok=True)
            return
        pid = int(data["pid"])
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.pid == pid:
                if self.proc.poll() is not None:
                    break
            else:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            if self.proc is not None and self.proc.pid == pid:
                self.proc.wait(5)
        self.pidfile.unlink(missing_ok=True)

    def start(self, version: str, serve: dict[str, Any]) -> None:
        tmpl = self.cfg.serve_command or default_serve_command(serve)
        values = {"python": sys.executable, "home": str(self.cfg.home),
                  "model": str(self.cfg.home / "current" / serve.get("model", "model")),
                  "name": serve.get("name", "model"), "host": self.cfg.serve_host, "port": str(self.cfg.serve_port)}
        cmd = [part.format(**values) for part in tmpl]
        logf = (self.cfg.home / "serve.log").open("ab")
        logf.write(f"--- {utc_now()} starting {version}: {' '.join(cmd)}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.cfg.home)
        logf.close()
        write_json_atomic(self.pidfile, {"pid": self.proc.pid, "version": version, "port": self.cfg.serve_port,
                                         "cmd": cmd, "started": utc_now()})

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            if self.ready():
                return True
            time.sleep(0.25)
        return False


@dataclass
class SmokeResult:
    passed: bool
    reason: str
    scores: dict[str, float] = field(default_factory=dict)


def run_smoke(bundle: Path) -> SmokeResult:
    """The bundle's smoke test: greedy answers through its engine, scored, gates checked."""
    from slmops.evaluate.gates import check_gates, parse_gate
    from slmops.rollout.blueprint import read_smoke_records
    from slmops.rollout.bundle import SERVE_FILE, SMOKE_FILE

    try:
        serve = json.loads((bundle / SERVE_FILE).read_text(encoding="utf-8"))
        smoke = json.loads((bundle / SMOKE_FILE).read_text(encoding="utf-8"))
        records = read_smoke_records(bundle / Path(SMOKE_FILE).parent / safe_relpath(smoke["data"]))
        gates = [parse_gate(g) for g in smoke["gate"]]
    except (OSError, KeyError, ValueError, SlmopsError) as exc:
        return SmokeResult(False, f"smoke test unreadable: {getattr(exc, 'message', exc)}")
    try:
        from slmops.engines import open_engine
        from slmops.evaluate.runner import evaluate_engine

        opts: dict[str, Any] = {}
        threads = (serve.get("engine_options") or {}).get("threads")
        if threads:
            opts["threads"] = int(threads)
        engine = open_engine(bundle / safe_relpath(serve.get("model", "model")), **opts)
        try:
            res = evaluate_engine(engine, records, max_new_tokens=int(smoke.get("max_new_tokens", 64)))
        finally:
            engine.close()
        results = check_gates(res.scores, gates)
    except Exception as exc:  # noqa: BLE001 - any failure to load or run the model fails the smoke test
        return SmokeResult(False, f"smoke test could not run: {getattr(exc, 'message', None) or exc!r}")
    failed = [r.reason for r in results if not r.passed]
    scores = {k: float(v) for k, v in res.scores.items() if isinstance(v, int | float)}
    if failed:
        return SmokeResult(False, "smoke test failed: " + "; ".join(f.removeprefix("gate failed: ") for f in failed),
                           scores)
    return SmokeResult(True, "smoke test passed: " + ", ".join(r.reason.removeprefix("gate passed: ") for r in results),
                       scores)


class _Metrics:
    def __init__(self, port: int, labels: dict[str, str], host: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.labels = labels
        self.version = Gauge("slmops_agent_version_info", "The version this device runs (value 1).",
                             ["version", "device_id", "profile", "channel"], registry=self.registry)
        self.rollbacks = Counter("slmops_agent_rollbacks", "Versions this device rolled back from.",
                                 registry=self.registry)
        self.last_check = Gauge("slmops_agent_last_check_timestamp", "Unix time of the last poll of the index.",
                                registry=self.registry)
        self.failures = Gauge("slmops_agent_failed_versions", "Versions that failed on this device.",
                              registry=self.registry)
        self._rollbacks = 0
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)

    def update(self, report: dict[str, Any]) -> None:
        self.version.clear()
        self.version.labels(version=report.get("version") or "none", **self.labels).set(1)
        total = int(report.get("rollbacks_total") or 0)
        if total > self._rollbacks:
            self.rollbacks.inc(total - self._rollbacks)
            self._rollbacks = total
        self.last_check.set(report.get("last_check") or time.time())
        self.failures.set(len(report.get("failures") or {}))


class Agent:
    """One device. `poll()` does one round (see the module docstring) and returns the report it sent."""

    def __init__(self, cfg: AgentConfig):
        check_device_id(cfg.device_id)
        self.cfg = cfg
        self.home = Path(cfg.home).expanduser().resolve()
        cfg.home = self.home
        (self.home / "versions").mkdir(parents=True, exist_ok=True)
        self.state_path = self.home / "state.json"
        self.state = self._load_state()
        self.server = LocalServer(cfg)
        self.metrics = (_Metrics(cfg.metrics_port, {"device_id": cfg.device_id, "profile": cfg.profile,
                                                    "channel": cfg.channel}, cfg.metrics_host)
                        if cfg.metrics_port is not None else None)
        self._lock_fd: int | None = None

    # --- state ------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            state = {}
        state.setdefault("failures", {})
        state.setdefault("rollbacks_total", 0)
        state.setdefault("installed", {})  # version -> bundle.json sha256
        return state

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)

    def lock(self) -> None:
        """Hold ``HOME/agent.lock`` (one agent per home); SlmopsError if another agent holds it."""
        import fcntl

        fd = os.open(self.home / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SlmopsError(f"another agent is running on {self.home}", "stop it, or use another --home") from None
        self._lock_fd = fd

    def current_version(self) -> str | None:
        link = self.home / "current"
        if not link.is_symlink():
            return None
        target = Path(os.readlink(link))
        return target.name if (self.home / "versions" / target.name).is_dir() else None

    def _fail(self, version: str, stage: str, reason: str, retry: bool) -> None:
        self.state["failures"][version] = {"stage": stage, "reason": reason, "time": utc_now(), "retry": retry}
        self._save_state()

    # --- one poll ---------------------------------------------------------------------------------
    def poll(self) -> dict[str, Any]:
        cfg = self.cfg
        report: dict[str, Any] = {"device_id": cfg.device_id, "profile": cfg.profile, "channel": cfg.channel,
                                  "bucket": bucket(cfg.channel, cfg.device_id), "target": None, "in_rollout": None}
        try:
            state, message = self._poll(report)
        except SlmopsError as exc:
            state, message = "error", exc.message
        except Exception as exc:  # noqa: BLE001 - an agent keeps running; the report carries the error
            log.exception("agent poll failed")
            state, message = "error", repr(exc)
        return self._report(report, state, message)

    def _poll(self, report: dict[str, Any]) -> tuple[str, str]:
        cfg = self.cfg
        ch = read_channel(cfg.index, cfg.channel)
        release, inside = ch.target(cfg.device_id)
        report["in_rollout"] = inside
        current = self.current_version()
        if release is None:
            self._ensure_serving(current)
            return "waiting", f"channel {cfg.channel} has no version for this device yet"
        v = release.version
        report["target"] = v
        if v == current:
            self._ensure_serving(current)
            return "ok", f"running {v}"
        failure = self.state["failures"].get(v)
        if failure and not failure.get("retry", True):
            self._ensure_serving(current)
            return "ok", f"{v} failed here before ({failure['stage']}); not retried; running {current or 'nothing'}"
        ref = release.bundles.get(cfg.profile)
        if ref is None:
            self._ensure_serving(current)
            return "no_bundle", f"{v} has no bundle for profile {cfg.profile} (has: {', '.join(release.bundles)})"
        try:
            staged, fresh = self._fetch(v, ref)
        except IntegrityError as exc:
            self._fail(v, "verify", exc.message, retry=True)
            self._ensure_serving(current)
            return "verify_failed", f"refused {v}: {exc.message}"
        except SlmopsError as exc:
            self._fail(v, "download", exc.message, retry=True)
            self._ensure_serving(current)
            return "error", f"could not download {v}: {exc.message}"
        if fresh:
            smoke = run_smoke(staged)
            if not smoke.passed:
                shutil.rmtree(staged, ignore_errors=True)
                self.state["rollbacks_total"] += 1
                self._fail(v, "smoke", smoke.reason, retry=False)
                self._ensure_serving(current)
                return "rolled_back", f"{v}: {smoke.reason}; staying on {current or 'nothing'}"
            final = self.home / "versions" / v
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
        self.state["installed"][v] = ref.bundle_sha256
        self._save_state()
        self._switch(v)
        if cfg.serve and not self._restart_server(v):
            self._switch(current)
            if current is not None:
                self._restart_server(current)
            else:
                self.server.stop()
            shutil.rmtree(self.home / "versions" / v, ignore_errors=True)
            self.state["installed"].pop(v, None)
            self.state["rollbacks_total"] += 1
            reason = f"the server did not become ready within {cfg.ready_timeout:g}s (see {self.home / 'serve.log'})"
            self._fail(v, "ready", reason, retry=False)
            return "rolled_back", f"{v}: {reason}; switched back to {current or 'nothing'}"
        self.state["failures"].pop(v, None)
        self._save_state()
        self._prune()
        return "updated", f"switched {current or 'nothing'} -> {v}" + (" (serving)" if cfg.serve else "")

    # --- steps ------------------------------------------------------------------------------------
    def _fetch(self, version: str, ref: BundleRef) -> tuple[Path, bool]:
        """(bundle folder, whether it is a fresh download to smoke-test). Verifies everything."""
        kept = self.home / "versions" / version
        if kept.is_dir():
            try:
                verify_bundle_dir(kept, ref.bundle_sha256)
                return kept, False
            except (IntegrityError, SlmopsError, OSError, ValueError):
                shutil.rmtree(kept, ignore_errors=True)
        tmp = self.home / "versions" / f".{version}.{uuid.uuid4().hex[:8]}.partial"
        tmp.mkdir(parents=True)
        try:
            base = join_ref(self.cfg.index, ref.url.rstrip("/") or ".")
            raw = read_bytes(join_ref(base, BUNDLE_MANIFEST))
            got = sha256_bytes(raw)
            if got != ref.bundle_sha256:
                raise IntegrityError(f"{BUNDLE_MANIFEST} sha256 {got[:12]}... does not match the channel's "
                                     f"{ref.bundle_sha256[:12]}...")
            try:
                manifest = json.loads(raw)
                files = manifest["files"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise IntegrityError(f"{BUNDLE_MANIFEST} is not a bundle manifest") from None
            for rel, meta in files.items():
                rel = safe_relpath(rel)
                dest = tmp / rel
                if not dest.resolve().is_relative_to(tmp.resolve()):
                    raise IntegrityError(f"unsafe path {rel!r} in {BUNDLE_MANIFEST}")
                sha = copy_to(join_ref(base, rel), dest)
                if sha != meta.get("sha256") or dest.stat().st_size != meta.get("size", dest.stat().st_size):
                    raise IntegrityError(f"{rel}: sha256 {sha[:12]}... does not match {BUNDLE_MANIFEST}'s "
                                         f"{str(meta.get('sha256'))[:12]}...")
            write_atomic(tmp / BUNDLE_MANIFEST, raw)
            verify_bundle_dir(tmp, ref.bundle_sha256)  # belt and braces: what is on disk is what was checked
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp, True

    def _switch(self, version: str | None) -> None:
        link = self.home / "current"
        if version is None:
            if link.is_symlink():
                link.unlink()
            return
        tmp = self.home / f".current.{uuid.uuid4().hex[:8]}"
        os.symlink(f"versions/{version}", tmp)
        os.replace(tmp, link)

    def _serve_settings(self, version: str) -> dict[str, Any]:
        from slmops.rollout.bundle import SERVE_FILE

        return json.loads((self.home / "versions" / version / SERVE_FILE).read_text(encoding="utf-8"))

    def _restart_server(self, version: str) -> bool:
        self.server.stop()
        self.server.start(version, self._serve_settings(version))
        ok = self.server.wait_ready(self.cfg.ready_timeout)
        if not ok:
            self.server.stop()
        return ok

    def _ensure_serving(self, version: str | None) -> None:
        if not self.cfg.serve or version is None:
            return
        info = self.server.info()
        if info is not None and info.get("version") == version:
            return
        self._restart_server(version)

    def _prune(self) -> None:
        keep = max(2, self.cfg.keep_versions)
        current = self.current_version()
        versions = sorted((p for p in (self.home / "versions").iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: p.stat().st_mtime, reverse=True)
        for p in versions[keep:]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)
                self.state["installed"].pop(p.name, None)
        self._save_state()

    def _report(self, report: dict[str, Any], state: str, message: str) -> dict[str, Any]:
        now = time.time()
        info = self.server.info() if self.cfg.serve else None
        report.update({
            "version": self.current_version(), "state": state, "message": message,
            "failures": self.state["failures"], "rollbacks_total": self.state["rollbacks_total"],
            "serving": bool(info), "serve_port": self.cfg.serve_port if info else None,
            "last_check": now, "time": utc_now(),
        })
        write_atomic(self.home / "report.json", dumps(report))
        if self.cfg.collector:
            try:
                from slmops.rollout.status import save_report

                save_report(self.cfg.collector, report)
            except SlmopsError as exc:
                log.warning("could not deliver the report: %s", exc.message)
        if self.metrics is not None:
            self.metrics.update(report)
        return report

    def run(self, interval: float = 60.0, once: bool = False, on_report=None) -> dict[str, Any]:
        """Poll until interrupted (or once); returns the last report."""
        self.lock()
        while True:
            report = self.poll()
            if on_report is not None:
                on_report(report)
            if once:
                return report
            time.sleep(interval)


__all__ = ["Agent", "AgentConfig", "LocalServer", "SmokeResult", "default_serve_command", "run_smoke"]

"""The registry: an embedded SQLite (WAL) index over artifact manifests, and its operations.

Tables: ``artifacts`` (one row per manifest), ``edges`` (parent -> child lineage), ``metrics`` (numeric
metrics for querying), ``aliases`` (a name pointing at an artifact id) and ``events`` (append-only log of
alias changes and removals: who, when, what, why). The artifact folders are the truth;
`Workspace.rebuild_registry` re-creates the artifact, edge and metric tables from them (aliases and events
are kept). SQLite triggers refuse any UPDATE or DELETE on ``events``.

Model aliases belong to a model *name* (the manifest's ``name``) and are stored as ``NAME@ALIAS``
(``tiny@production``), which every command accepts wherever it takes a model. They move only through
logged operations (see docs/operations.md):

- :func:`promote` points ``NAME@ALIAS`` at an artifact, only when the artifact's recorded quality gates
  passed (``manifest.metrics["gates"]["passed"] is True``, written by ``slmops eval --gate``); ``force``
  with a ``reason`` overrides, and the override is in the event;
- :func:`rollback` restores the previous holder of an alias, replaying the alias's events as a stack
  (each promotion pushes, each rollback pops), so repeated rollbacks walk further back;
- :func:`history` lists a name's alias events; :func:`list_aliases` the current aliases.

The actor recorded as ``who`` is ``$SLMOPS_USER`` when set (CI, pipelines), else the login name.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from slmops.errors import BadInputError, GateFailedError, NotFoundError

if TYPE_CHECKING:
    from slmops.workspace import Manifest, Workspace

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    created TEXT NOT NULL, manifest TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS edges (parent TEXT NOT NULL, child TEXT NOT NULL, PRIMARY KEY (parent, child));
CREATE TABLE IF NOT EXISTS metrics (id TEXT NOT NULL, key TEXT NOT NULL, value REAL, PRIMARY KEY (id, key));
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, id TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, who TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS edges_child ON edges(child);
CREATE INDEX IF NOT EXISTS events_subject ON events(subject);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the events table is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the events table is append-only'); END;
"""

# actions of alias events (subject = the alias); "remove" events have an artifact id as subject
ALIAS_ACTIONS = ("alias", "promote", "rollback")
# aliases that only `promote` (gated) and `rollback` may move; `slmops registry alias` refuses them
GATED_ALIASES = ("staging", "production")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _who() -> str:
    if os.environ.get("SLMOPS_USER"):
        return os.environ["SLMOPS_USER"]
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover - no user in some containers
        return "unknown"


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._retry_locked(self._setup)

    def _setup(self) -> None:
        # switching a new database to WAL needs an exclusive lock and does not wait on the busy timeout, so
        # processes opening a fresh workspace together (e.g. `accelerate launch` ranks) may see "locked"
        if str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    @staticmethod
    def _retry_locked(fn, wait_s: float = 30.0) -> None:
        """Run `fn`, retrying for up to `wait_s` while another process holds the database locked."""
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            try:
                fn()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(0.5, delay * 2)

    def close(self) -> None:
        self._db.close()

    # --- artifacts -------------------------------------------------------------------------------
    def index(self, m: Manifest, folder: Path) -> None:
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO artifacts(id, kind, name, path, created, manifest) VALUES (?,?,?,?,?,?)",
                (m.id, m.kind, m.name, str(folder), m.created, m.to_json()),
            )
            self._db.execute("DELETE FROM edges WHERE child=?", (m.id,))
            self._db.executemany("INSERT OR IGNORE INTO edges(parent, child) VALUES (?,?)",
                                 [(p, m.id) for p in m.parents])
            self._db.execute("DELETE FROM metrics WHERE id=?", (m.id,))
            self._db.executemany(
                "INSERT INTO metrics(id, key, value) VALUES (?,?,?)",
                [(m.id, k, float(v)) for k, v in _flat_numbers(m.metrics).items()],
            )

    def get(self, art_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM artifacts WHERE id=?", (art_id,)).fetchone()
        return dict(row) if row else None

    def lookup(self, ref: str) -> str | None:
        """Folder path for an id or alias; None if neither."""
        row = self._db.execute("SELECT path FROM artifacts WHERE id=?", (ref,)).fetchone()
        if row:
            return row["path"]
        alias = self._db.execute("SELECT id FROM aliases WHERE alias=?", (ref,)).fetchone()
        if alias:
            row = self._db.execute("SELECT path FROM artifacts WHERE id=?", (alias["id"],)).fetchone()
            return row["path"] if row else None
        return None

    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT id, kind, name, path, created FROM artifacts"
        args: tuple = ()
        if kind:
            q += " WHERE kind=?"
            args = (kind,)
        rows = [dict(r) for r in self._db.execute(q + " ORDER BY created DESC, id DESC", args)]
        aliases = self.aliases()
        for r in rows:
            r["aliases"] = sorted(a for a, i in aliases.items() if i == r["id"])
        return rows

    def metrics(self, art_id: str) -> dict[str, float]:
        return {r["key"]: r["value"] for r in self._db.execute("SELECT key, value FROM metrics WHERE id=?", (art_id,))}

    def parents(self, art_id: str) -> list[str]:
        return [r["parent"] for r in self._db.execute("SELECT parent FROM edges WHERE child=?", (art_id,))]

    def children(self, art_id: str) -> list[str]:
        return [r["child"] for r in self._db.execute("SELECT child FROM edges WHERE parent=?", (art_id,))]

    def lineage(self, art_id: str) -> dict[str, list[str]]:
        """Ancestors and descendants of an artifact (transitive), nearest first."""

        def walk(start: str, step) -> list[str]:
            seen: list[str] = []
            frontier = [start]
            while frontier:
                nxt = []
                for node in frontier:
                    for other in step(node):
                        if other not in seen and other != art_id:
                            seen.append(other)
                            nxt.append(other)
                frontier = nxt
            return seen

        return {"ancestors": walk(art_id, self.parents), "descendants": walk(art_id, self.children)}

    def delete(self, art_id: str) -> None:
        row = self.get(art_id)
        with self._tx():
            self._db.execute("DELETE FROM artifacts WHERE id=?", (art_id,))
            self._db.execute("DELETE FROM edges WHERE child=? OR parent=?", (art_id, art_id))
            self._db.execute("DELETE FROM metrics WHERE id=?", (art_id,))
            dropped = [r["alias"] for r in self._db.execute("SELECT alias FROM aliases WHERE id=?", (art_id,))]
            self._db.execute("DELETE FROM aliases WHERE id=?", (art_id,))
            self._event("remove", art_id, {"aliases_dropped": dropped, "name": row["name"] if row else None})

    def clear_artifacts(self) -> None:
        with self._tx():
            for table in ("artifacts", "edges", "metrics"):
                self._db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names

    # --- aliases and events ----------------------------------------------------------------------
    def set_alias(self, alias: str, art_id: str, reason: str = "", *, action: str = "alias",
                  detail: dict[str, Any] | None = None, who: str | None = None) -> str | None:
        """Point `alias` at `art_id`; returns the previous holder. Logged as an event (`action`, with
        `detail` merged into ``{"to", "from", "reason"}``)."""
        if self.get(art_id) is None:
            raise NotFoundError(f"no artifact {art_id!r} to alias")
        with self._tx():
            prev = self._db.execute("SELECT id FROM aliases WHERE alias=?", (alias,)).fetchone()
            self._db.execute("INSERT OR REPLACE INTO aliases(alias, id, updated) VALUES (?,?,?)",
                             (alias, art_id, _now()))
            self._event(action, alias, {"to": art_id, "from": prev["id"] if prev else None, "reason": reason,
                                        **(detail or {})}, who=who)
        return prev["id"] if prev else None

    def alias_holders(self, alias: str) -> list[str]:
        """The holders of `alias` as a stack replayed from its events, oldest first, current last: a set or
        promotion pushes its target (unless it already is on top), a rollback pops back to its target."""
        stack: list[str] = []
        for ev in self.events(alias):
            target = ev["detail"].get("to")
            if ev["action"] == "rollback":
                if stack:
                    stack.pop()
                while stack and stack[-1] != target:
                    stack.pop()
                if not stack and target:
                    stack.append(target)
            elif ev["action"] in ("alias", "promote") and target and (not stack or stack[-1] != target):
                stack.append(target)
        return stack

    def rollback_alias(self, alias: str, reason: str = "", *, detail: dict[str, Any] | None = None,
                       who: str | None = None) -> tuple[str, str | None]:
        """Point `alias` back at its previous holder (skipping holders removed since); ``(restored, replaced)``.
        Read and write happen in one transaction, so two rollbacks at once cannot both restore the same one."""
        with self._tx():
            row = self._db.execute("SELECT id FROM aliases WHERE alias=?", (alias,)).fetchone()
            current = row["id"] if row else None
            stack = self.alias_holders(alias)
            if stack and stack[-1] == current:
                stack.pop()
            restored = next((h for h in reversed(stack) if h != current and self.get(h) is not None), None)
            if restored is None:
                raise BadInputError(
                    f"{alias} has no previous holder to roll back to"
                    + (f" (it points at {current})" if current else " (it is not set)"),
                    f"see `slmops registry history {alias.rpartition('@')[0] or alias}`")
            self._db.execute("INSERT OR REPLACE INTO aliases(alias, id, updated) VALUES (?,?,?)",
                             (alias, restored, _now()))
            self._event("rollback", alias, {"to": restored, "from": current, "reason": reason, **(detail or {})},
                        who=who)
        return restored, current

    def aliases(self) -> dict[str, str]:
        return {r["alias"]: r["id"] for r in self._db.execute("SELECT alias, id FROM aliases")}

    def alias_rows(self) -> list[dict[str, Any]]:
        """Every alias with its artifact id and when it last changed, sorted by alias."""
        return [dict(r) for r in self._db.execute("SELECT alias, id, updated FROM aliases ORDER BY alias")]

    def events(self, subject: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM events", ()
        if subject:
            q, args = q + " WHERE subject=?", (subject,)
        out = []
        for r in self._db.execute(q + " ORDER BY seq", args):
            d = dict(r)
            d["detail"] = json.loads(d["detail"])
            out.append(d)
        return out

    def _event(self, action: str, subject: str, detail: dict, who: str | None = None) -> int:
        cur = self._db.execute("INSERT INTO events(at, who, action, subject, detail) VALUES (?,?,?,?,?)",
                               (_now(), who or _who(), action, subject, json.dumps(detail)))
        return int(cur.lastrowid)

    def _tx(self):
        db = self._db

        class _Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                db.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, int | float):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(_flat_numbers(v, key + "."))
    return out


# --- operations: promote, rollback, history ------------------------------------------------------------
def model_alias(name: str, alias: str) -> str:
    """The stored form of a model alias: ``NAME@ALIAS``."""
    return f"{name}@{alias}"


def split_alias(ref: str) -> tuple[str, str] | None:
    """``(name, alias)`` for ``NAME@ALIAS``, None for a plain alias or id."""
    name, sep, alias = ref.rpartition("@")
    return (name, alias) if sep and name and alias else None


def check_alias_name(alias: str) -> str:
    """`alias` if it is a valid alias name (letters, digits, ``_ . -``; no ``@``), else BadInputError."""
    if not _ALIAS_RE.match(alias or ""):
        raise BadInputError(f"bad alias name {alias!r}",
                            "use letters, digits, '_', '.' or '-' (e.g. candidate, staging, production)")
    return alias


@dataclass
class PromotionResult:
    """What :func:`promote` did. ``changed`` is False when the artifact already held the alias (no event)."""

    id: str
    name: str
    alias: str
    previous: str | None
    changed: bool
    forced: bool = False
    reason: str = ""
    gates_passed: bool | None = None
    event_seq: int | None = None

    @property
    def ref(self) -> str:
        return model_alias(self.name, self.alias)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ref": self.ref}


class RollbackResult(NamedTuple):
    """``(restored_id, replaced_id)`` of :func:`rollback`, plus the alias it acted on."""

    restored_id: str
    replaced_id: str | None
    ref: str


@dataclass
class AliasEvent:
    """One alias event: who did what to ``NAME@ALIAS``, when and why."""

    seq: int
    at: str
    who: str
    action: str  # alias | promote | rollback | remove
    name: str
    alias: str | None
    to: str | None
    from_: str | None
    reason: str = ""
    forced: bool = False
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["from"] = d.pop("from_")
        return d


@dataclass
class AliasInfo:
    """A current alias: ``ref`` (``NAME@ALIAS`` or a plain alias) -> artifact ``id``."""

    ref: str
    name: str | None
    alias: str
    id: str
    kind: str | None
    updated: str


def gate_status(manifest: Manifest) -> tuple[bool | None, str]:
    """``(passed, explanation)`` from an artifact's recorded gates; passed is None when none are recorded."""
    gates = (manifest.metrics or {}).get("gates")
    if not isinstance(gates, dict) or not isinstance(gates.get("passed"), bool):
        return None, "no quality gates recorded"
    data = f" on {gates['data']}" if gates.get("data") else ""
    checks = [c for c in gates.get("checks") or [] if isinstance(c, dict)]
    if gates["passed"]:
        return True, f"{len(checks)} gate(s) passed{data}"
    failed = [str(c.get("reason") or c.get("expr") or c.get("metric")) for c in checks if not c.get("passed")]
    return False, f"gate failed{data}: " + ("; ".join(failed) if failed else "gates.passed is false")


def promote(ws: Workspace, ref: str, to: str, *, force: bool = False, reason: str = "", verify: bool = True,
            who: str | None = None) -> PromotionResult:
    """Point ``NAME@to`` (NAME = the artifact's manifest name) at the artifact `ref`.

    Allowed only when the artifact's recorded gates passed; otherwise GateFailedError (exit 3) with a
    one-line reason. ``force=True`` overrides a failed or missing gate but needs a `reason`; both are logged
    in the event. With `verify`, the artifact's files are re-hashed first (IntegrityError when changed).
    Promoting the current holder again changes nothing and logs nothing (``changed=False``).
    """
    check_alias_name(to)
    reason = (reason or "").strip()
    if force and not reason:
        raise BadInputError("--force needs --reason: an override of the quality gates must say why",
                            'e.g. --force --reason "hotfix for incident 123, eval rerun tomorrow"')
    manifest = ws.manifest(ref)
    if ws.registry.get(manifest.id) is None:
        raise NotFoundError(f"{ref} is not a registered artifact", "only workspace artifacts can be promoted")
    target = model_alias(manifest.name, to)
    passed, why = gate_status(manifest)
    if not passed and not force:
        hint = (f"evaluate it with gates first: slmops eval --model {manifest.id} --data FILE --gate "
                "'exact_match>=0.9'" if passed is None else "improve the model, or override with --force --reason TEXT")
        raise GateFailedError(f"refusing to promote {manifest.id} to {target}: {why}", hint)
    if verify:
        res = ws.verify(manifest.id)
        if not res.ok:
            from slmops.errors import IntegrityError

            raise IntegrityError(f"refusing to promote {res.describe()}", "the files changed since it was created")
    current = ws.registry.aliases().get(target)
    if current == manifest.id:
        return PromotionResult(manifest.id, manifest.name, to, current, False, force, reason, passed)
    detail = {"name": manifest.name, "alias": to, "forced": bool(force and not passed), "gates_passed": passed,
              "gates": why}
    ws.registry.set_alias(target, manifest.id, reason, action="promote", detail=detail, who=who)
    seq = ws.registry.events(target)[-1]["seq"]
    return PromotionResult(manifest.id, manifest.name, to, current, True, bool(force and not passed), reason,
                           passed, seq)


def rollback(ws: Workspace, name: str, alias: str = "production", *, reason: str = "",
             who: str | None = None) -> RollbackResult:
    """Restore the previous holder of ``NAME@alias``: ``(restored_id, replaced_id)``. Repeated rollbacks walk
    further back through the alias's history; BadInputError when there is no previous holder. `name` may
    also be given as ``NAME@ALIAS`` (then `alias` is ignored)."""
    parts = split_alias(name)
    if parts:
        name, alias = parts
    check_alias_name(alias)
    target = model_alias(name, alias)
    if not ws.registry.events(target):
        known = sorted({a.ref for a in list_aliases(ws)})
        raise NotFoundError(f"no alias {target} (it has never been set)",
                            "aliases: " + (", ".join(known) if known else "none yet; see `slmops registry promote`"))
    restored, replaced = ws.registry.rollback_alias(target, (reason or "").strip(),
                                                    detail={"name": name, "alias": alias}, who=who)
    return RollbackResult(restored, replaced, target)


def history(ws: Workspace, name: str) -> list[AliasEvent]:
    """Every alias event of model `name` (all its aliases), oldest first, plus removals of its artifacts
    that dropped aliases."""
    out = []
    for ev in ws.registry.events():
        d = ev["detail"]
        parts = split_alias(ev["subject"])
        if ev["action"] in ALIAS_ACTIONS and parts and parts[0] == name:
            out.append(AliasEvent(ev["seq"], ev["at"], ev["who"], ev["action"], name, parts[1], d.get("to"),
                                  d.get("from"), d.get("reason") or "", bool(d.get("forced")), d))
        elif ev["action"] == "remove" and d.get("name") == name and d.get("aliases_dropped"):
            out.append(AliasEvent(ev["seq"], ev["at"], ev["who"], "remove", name, None, None, ev["subject"],
                                  "", False, d))
    return out


def list_aliases(ws: Workspace, name: str | None = None) -> list[AliasInfo]:
    """The current aliases (model aliases ``NAME@ALIAS`` and plain ones), sorted; only `name`'s when given."""
    out = []
    for r in ws.registry.alias_rows():
        parts = split_alias(r["alias"])
        if name is not None and (not parts or parts[0] != name):
            continue
        art = ws.registry.get(r["id"])
        out.append(AliasInfo(r["alias"], parts[0] if parts else None, parts[1] if parts else r["alias"], r["id"],
                             art["kind"] if art else None, r["updated"]))
    return out

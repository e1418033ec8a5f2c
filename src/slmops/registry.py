"""The registry: an embedded SQLite (WAL) index over artifact manifests.

Tables: ``artifacts`` (one row per manifest), ``edges`` (parent -> child lineage), ``metrics`` (numeric
metrics for querying), ``aliases`` (a name pointing at an artifact id) and ``events`` (append-only log of
alias changes and removals). The artifact folders are the truth; `Workspace.rebuild_registry` re-creates
the artifact, edge and metric tables from them (aliases and events are kept).
"""

from __future__ import annotations

import getpass
import json
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmops.workspace import Manifest

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
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _who() -> str:
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
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

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
        with self._tx():
            self._db.execute("DELETE FROM artifacts WHERE id=?", (art_id,))
            self._db.execute("DELETE FROM edges WHERE child=? OR parent=?", (art_id, art_id))
            self._db.execute("DELETE FROM metrics WHERE id=?", (art_id,))
            dropped = [r["alias"] for r in self._db.execute("SELECT alias FROM aliases WHERE id=?", (art_id,))]
            self._db.execute("DELETE FROM aliases WHERE id=?", (art_id,))
            self._event("remove", art_id, {"aliases_dropped": dropped})

    def clear_artifacts(self) -> None:
        with self._tx():
            for table in ("artifacts", "edges", "metrics"):
                self._db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names

    # --- aliases and events ----------------------------------------------------------------------
    def set_alias(self, alias: str, art_id: str, reason: str = "") -> str | None:
        """Point `alias` at `art_id`; returns the previous holder. Logged as an event."""
        if self.get(art_id) is None:
            from slmops.errors import NotFoundError

            raise NotFoundError(f"no artifact {art_id!r} to alias")
        with self._tx():
            prev = self._db.execute("SELECT id FROM aliases WHERE alias=?", (alias,)).fetchone()
            self._db.execute("INSERT OR REPLACE INTO aliases(alias, id, updated) VALUES (?,?,?)",
                             (alias, art_id, _now()))
            self._event("alias", alias, {"to": art_id, "from": prev["id"] if prev else None, "reason": reason})
        return prev["id"] if prev else None

    def aliases(self) -> dict[str, str]:
        return {r["alias"]: r["id"] for r in self._db.execute("SELECT alias, id FROM aliases")}

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

    def _event(self, action: str, subject: str, detail: dict) -> None:
        self._db.execute("INSERT INTO events(at, who, action, subject, detail) VALUES (?,?,?,?,?)",
                         (_now(), _who(), action, subject, json.dumps(detail)))

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

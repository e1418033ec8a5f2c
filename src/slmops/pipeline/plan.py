"""Load and validate a pipeline file (every problem at once, with its line), order its steps, compute cache
keys and the plan (which steps run, which are cached, and why).

References: ``${vars.NAME}`` is replaced by the variable's value (typed when it is the whole string);
``${steps.NAME.output}`` is an earlier step's output artifact (its id when it is the whole input, its folder
when followed by a path: ``${steps.data.output}/test.jsonl``). Step references are allowed in ``inputs`` only,
so that the graph is what the inputs say.

Cache key of a step = sha256 of: the kind, its validated options (defaults filled in), a fingerprint of every
input (files: their sha256; artifacts and earlier steps' outputs: the sha256 of their manifest's file
hashes, i.e. their content, not their id) and the slmops version.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slmops import __version__
from slmops.config import _line_of, _LineLoader, _strip_lines
from slmops.errors import BadInputError
from slmops.pipeline.spec import ANY_REF_RE, KINDS, REF_RE, VAR_RE, InputSpec, PipelineSpec, config_model

KEY_FORMAT = 1
_LINES = "__lines__"


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class InputValue:
    """One input after variables: a reference to a step's output (`step`, `suffix`) or a literal (`value`:
    an absolute path for files and folders, else the id/alias/URL as written)."""

    name: str
    text: str
    step: str | None = None
    suffix: str = ""
    value: str | None = None
    line: int | None = None


@dataclass
class Step:
    name: str
    kind: str
    index: int
    line: int
    inputs: dict[str, InputValue]
    options: dict[str, Any]           # as written (variables replaced)
    options_json: dict[str, Any]      # validated, defaults filled in, input fields left out (for the key)
    deps: list[str]                   # upstream steps, in file order


@dataclass
class Pipeline:
    name: str
    path: Path
    base_dir: Path
    steps: list[Step]                 # in execution (topological) order
    vars: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def downstream(self, name: str) -> set[str]:
        """Every step that depends on `name`, transitively (not `name` itself)."""
        out: set[str] = set()
        frontier = {name}
        while frontier:
            frontier = {s.name for s in self.steps if set(s.deps) & frontier} - out
            out |= frontier
        return out

    def variant(self, skip: set[str] | list[str] = (), rewire: dict[str, str] | None = None) -> Pipeline:
        """A copy without the steps in `skip`, for callers that run only part of a pipeline (the quickstart's
        ``--no-export``). `rewire` first points inputs that read one step's output at another step's
        (``{"distill": "teacher"}``: fine-tune the teacher instead of the student). A step that reads a
        skipped step's output through an optional input loses that input; through a required one it is
        skipped too, and so on downstream. Cache keys are unchanged: the variant shares its state with
        the full pipeline, and an unchanged step stays cached across variants."""
        rewire = dict(rewire or {})
        known = set(self.names)
        bad = sorted((set(skip) | set(rewire) | set(rewire.values())) - known)
        if bad:
            raise BadInputError(f"pipeline {self.name} has no step {', '.join(bad)}", f"steps: {', '.join(self.names)}")
        dropped = set(skip)
        steps: list[Step] = []
        for s in self.steps:  # topological order: every dependency is decided before its dependents
            if s.name in dropped:
                continue
            spec = KINDS[s.kind]
            inputs: dict[str, InputValue] = {}
            keep = True
            for iname, iv in s.inputs.items():
                if iv.step in rewire:
                    new = rewire[iv.step]
                    iv = InputValue(iv.name, "${steps." + new + ".output}" + iv.suffix, new, iv.suffix, None, iv.line)
                if iv.step in dropped:
                    required = spec.inputs.get(iname) is not None and spec.inputs[iname].required
                    if required:
                        keep = False
                        break
                    continue
                inputs[iname] = iv
            if not keep:
                dropped.add(s.name)
                continue
            from_inputs = list(dict.fromkeys(iv.step for iv in inputs.values() if iv.step is not None))
            old_from_inputs = {iv.step for iv in s.inputs.values() if iv.step is not None}
            after = [d for d in s.deps if d not in old_from_inputs and d not in dropped]
            steps.append(Step(s.name, s.kind, s.index, s.line, inputs, s.options, s.options_json,
                              from_inputs + [d for d in after if d not in from_inputs]))
        return Pipeline(self.name, self.path, self.base_dir, _topo_order(steps), dict(self.vars))

    def upstream(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = set(self.step(name).deps)
        while frontier:
            out |= frontier
            frontier = {d for f in frontier for d in self.step(f).deps} - out
        return out


class _Problems:
    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[int, str]] = []

    def add(self, line: int | None, msg: str) -> None:
        self.items.append((line or 0, msg))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        lines = [f"{self.source}:{line}: {msg}" if line else f"{self.source}: {msg}"
                 for line, msg in sorted(self.items, key=lambda x: x[0])]
        n = len(lines)
        raise BadInputError(f"pipeline {self.source} has {n} problem{'s' if n > 1 else ''} (nothing was run):\n"
                            + "\n".join(lines), "fix them and run again; `slmops run FILE --dry-run` checks "
                            "without running")


# --- loading -------------------------------------------------------------------------------------------


def _first_line(d: Any) -> int | None:
    lines = d.get(_LINES, {}) if isinstance(d, dict) else {}
    return min(lines.values()) if lines else None


def _apply_overrides(raw: dict, overrides: list[str], problems: _Problems) -> None:
    """`--set vars.NAME=V`, `--set STEP.OPTION[.SUB]=V`, `--set STEP.inputs.NAME=V` (V is YAML)."""
    steps = {s.get("name"): s for s in raw.get("steps") or [] if isinstance(s, dict)}
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or "." not in key:
            problems.add(None, f"--set {item!r}: expected KEY=VALUE with KEY vars.NAME, STEP.OPTION or "
                         "STEP.inputs.NAME")
            continue
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        head, *path = key.split(".")
        if head == "vars":
            raw.setdefault("vars", {})
            if not isinstance(raw["vars"], dict):
                raw["vars"] = {}
            raw["vars"][".".join(path)] = value
            continue
        if head not in steps:
            problems.add(None, f"--set {item!r}: no step named {head!r} (steps: {', '.join(map(str, steps))})")
            continue
        target = steps[head]
        if path[0] == "inputs" and len(path) == 2:
            container = target.setdefault("inputs", {})
            path = path[1:]
        else:
            container = target.setdefault("options", {})
        if not isinstance(container, dict):
            problems.add(_first_line(target), f"--set {item!r}: the step's options are not a mapping")
            continue
        for part in path[:-1]:
            nxt = container.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                container[part] = nxt
            container = nxt
        container[path[-1]] = value


def _sub_vars(obj: Any, variables: dict[str, Any], problems: _Problems, line: int | None, where: str) -> Any:
    """Replace ${vars.NAME} in every string of `obj` (keeping the line records of mappings)."""
    if isinstance(obj, dict):
        lines = obj.get(_LINES, {})
        out = {k: (_sub_vars(v, variables, problems, lines.get(k, line), where) if k != _LINES else v)
               for k, v in obj.items()}
        return out
    if isinstance(obj, list):
        return [_sub_vars(v, variables, problems, line, where) for v in obj]
    if not isinstance(obj, str) or "${" not in obj:
        return obj
    whole = VAR_RE.fullmatch(obj.strip())
    if whole:
        name = whole.group(1)
        if name not in variables:
            problems.add(line, f"{where}: unknown variable ${{vars.{name}}} (vars: {', '.join(variables) or 'none'})")
            return obj
        return copy.deepcopy(variables[name])

    def repl(m):
        name = m.group(1)
        if name not in variables:
            problems.add(line, f"{where}: unknown variable ${{vars.{name}}} (vars: {', '.join(variables) or 'none'})")
            return m.group(0)
        return str(variables[name])

    return VAR_RE.sub(repl, obj)


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() if k != _LINES for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def load_pipeline(path: str | Path, *, overrides: list[str] | None = None, workspace=None) -> Pipeline:
    """Read and validate a pipeline file; raises one BadInputError listing every problem with its line.

    `overrides`: ``--set`` items. With a `workspace`, inputs that name artifacts or aliases are checked to
    exist in it."""
    path = Path(path).expanduser()
    source = str(path)
    if not path.is_file():
        raise BadInputError(f"pipeline file not found: {path}", "check the path (e.g. examples/quickstart.yaml)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise BadInputError(f"{path}: not valid YAML: {exc}") from exc
    problems = _Problems(source)
    if not isinstance(raw, dict):
        problems.add(None, "the file must be a mapping with name, vars and steps")
        problems.raise_if_any()
    _apply_overrides(raw, list(overrides or []), problems)
    try:
        spec = PipelineSpec.model_validate(_strip_lines(raw))
    except ValidationError as exc:
        for e in exc.errors():
            loc = tuple(e["loc"])
            # errors inside a step's options/inputs are reported by the per-step checks below
            if loc[:1] == ("steps",) and len(loc) >= 3 and loc[2] in ("options", "inputs"):
                continue
            msg = {"extra_forbidden": "unknown key; remove it or check its spelling",
                   "missing": "required key is missing; add it"}.get(e["type"], e["msg"])
            line = _line_of(raw, loc) or _first_line(_dig(raw, loc[:2])) or _first_line(raw)
            problems.add(line, f"{'.'.join(map(str, loc)) or '(root)'}: {msg}")
        spec = None
    raw_steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
    if spec is None and not raw_steps:
        problems.raise_if_any()
    variables = raw.get("vars") if isinstance(raw.get("vars"), dict) else {}
    variables = {k: _strip_lines(v) for k, v in variables.items() if k != _LINES}
    base_dir = path.resolve().parent

    names_seen: dict[str, int] = {}
    steps: list[Step] = []
    for index, rs in enumerate(raw_steps):
        if not isinstance(rs, dict):
            problems.add(None, f"steps[{index}] is not a mapping")
            continue
        lines = rs.get(_LINES, {})
        line = _first_line(rs) or 0
        name = rs.get("name")
        kind = rs.get("kind")
        if not isinstance(name, str) or not name:
            continue  # reported by the schema check
        label = f"step {name!r}"
        if name in names_seen:
            problems.add(lines.get("name", line), f"{label}: duplicate step name (first at line {names_seen[name]})")
            continue
        names_seen[name] = lines.get("name", line)
        if kind not in KINDS:
            problems.add(lines.get("kind", line), f"{label}: unknown step kind {kind!r} (kinds: {', '.join(KINDS)})")
            continue
        kspec = KINDS[kind]
        raw_inputs = rs.get("inputs") or {}
        raw_options = rs.get("options") or {}
        if not isinstance(raw_inputs, dict) or not isinstance(raw_options, dict):
            problems.add(line, f"{label}: inputs and options must be mappings")
            continue
        raw_inputs = _sub_vars(raw_inputs, variables, problems, lines.get("inputs", line), label)
        n_before = len(problems.items)
        raw_options = _sub_vars(raw_options, variables, problems, lines.get("options", line), label)
        bad_vars_in_options = len(problems.items) > n_before
        in_lines = raw_inputs.get(_LINES, {})
        opt_lines = raw_options.get(_LINES, {})
        # step references belong in inputs
        for s in _strings(raw_options):
            for m in ANY_REF_RE.finditer(s):
                if m.group(1).startswith("vars."):
                    continue  # an unknown variable, reported above
                problems.add(lines.get("options", line), f"{label}: options may not reference ${{{m.group(1)}}}; "
                             "step outputs go under inputs:")
        # inputs
        inputs: dict[str, InputValue] = {}
        for iname, ivalue in raw_inputs.items():
            if iname == _LINES:
                continue
            iline = in_lines.get(iname, lines.get("inputs", line))
            ispec = kspec.inputs.get(iname)
            if ispec is None and kspec.extra.get("profile_inputs"):
                ispec = InputSpec("ref", False, "the model of this blueprint profile")
            if ispec is None and kspec.extra.get("model_inputs"):
                ispec = InputSpec("ref", False, "one more model, measured beside the others")
            if ispec is None:
                problems.add(iline, f"{label}: unknown input {iname!r} for kind {kind} (inputs: "
                             f"{', '.join(kspec.inputs) or 'none'})")
                continue
            if not isinstance(ivalue, str) or not ivalue.strip():
                problems.add(iline, f"{label}: input {iname!r} must be a path, an artifact id/alias or "
                             "${steps.NAME.output}")
                continue
            inputs[iname] = _parse_input(iname, ivalue.strip(), iline, ispec, base_dir, workspace, label, problems)
        for iname, ispec in kspec.inputs.items():
            if ispec.required and iname not in raw_inputs:
                problems.add(lines.get("inputs", line), f"{label}: missing input {iname!r} ({ispec.help})")
        if kind == "bundle":
            _check_blueprint(inputs, raw_options, problems, label, lines.get("inputs", line))
        if kind == "import" and "path" not in raw_inputs and not raw_options.get("bundled"):
            problems.add(line, f"{label}: give the input `path` (a folder) or the option `bundled: demo-teacher`")
        # options
        options = _strip_lines(raw_options)
        options_json: dict[str, Any] = {}
        for bad in kspec.forbidden_options:
            if bad in options:
                problems.add(opt_lines.get(bad, line), f"{label}: option {bad!r} is set by `slmops run` "
                             "(--resume); remove it")
        clash = [k for k in options if k in kspec.inputs]
        for k in clash:
            problems.add(opt_lines.get(k, line), f"{label}: {k!r} is an input of {kind}: move it under inputs:")
        if not clash and not bad_vars_in_options and not any(b in options for b in kspec.forbidden_options):
            options_json = _validate_options(kind, options, raw_options, inputs, problems, label,
                                             lines.get("options", line))
        deps: list[str] = []
        for iv in inputs.values():
            if iv.step is not None and iv.step not in deps:
                deps.append(iv.step)
        after = rs.get("after") or []
        for a in after if isinstance(after, list) else []:
            if isinstance(a, str) and a not in deps:
                deps.append(a)
        steps.append(Step(name, kind, index, line, inputs, options, options_json, deps))

    # references to steps, and cycles
    known = {s.name for s in steps} | set(names_seen)
    for s in steps:
        for iv in s.inputs.values():
            if iv.step is not None and iv.step not in known:
                problems.add(iv.line, f"step {s.name!r}: input {iv.name!r} refers to unknown step {iv.step!r}")
            elif iv.step == s.name:
                problems.add(iv.line, f"step {s.name!r}: input {iv.name!r} refers to the step itself")
        for d in s.deps:
            if d not in known and all(iv.step != d for iv in s.inputs.values()):
                problems.add(s.line, f"step {s.name!r}: after: unknown step {d!r}")
    by_name = {s.name: s for s in steps}
    for cycle in _cycles(by_name):
        first = by_name[cycle[0]]
        problems.add(first.line, "cycle: " + " -> ".join([*cycle, cycle[0]]) + " (each step needs the output of the one before it)")
    # gate inputs must be eval steps
    for s in steps:
        if s.kind == "gate" and "eval" in s.inputs:
            iv = s.inputs["eval"]
            if iv.step in by_name and by_name[iv.step].kind != "eval":
                problems.add(iv.line, f"step {s.name!r}: input eval must be an eval step's output, "
                             f"{iv.step!r} is a {by_name[iv.step].kind} step")
    problems.raise_if_any()
    assert spec is not None
    return Pipeline(spec.name, path.resolve(), base_dir, _topo_order(steps), variables)


def _dig(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict):
            raw = raw.get(part)
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _parse_input(name: str, text: str, line: int | None, ispec, base_dir: Path, workspace, label: str,
                 problems: _Problems) -> InputValue:
    iv = InputValue(name, text, line=line)
    m = REF_RE.match(text)
    if m:
        iv.step = m.group(1)
        rest = text[m.end():]
        if rest and not rest.startswith("/"):
            problems.add(line, f"{label}: input {name!r}: after ${{steps.{iv.step}.output}} only /PATH may follow")
        iv.suffix = rest
        return iv
    for m2 in ANY_REF_RE.finditer(text):
        problems.add(line, f"{label}: input {name!r}: unknown reference ${{{m2.group(1)}}} (use "
                     "${steps.NAME.output} or ${vars.NAME})")
        return iv
    if ispec.type == "step":
        problems.add(line, f"{label}: input {name!r} must be ${{steps.NAME.output}} of an earlier step")
        return iv
    if ispec.url and text.startswith(("http://", "https://")):
        iv.value = text
        return iv
    p = Path(text).expanduser()
    p = p if p.is_absolute() else base_dir / p
    if ispec.type == "file":
        if not p.is_file():
            problems.add(line, f"{label}: input {name!r}: file not found: {p}")
        iv.value = str(p.resolve())
        return iv
    if p.exists():
        iv.value = str(p.resolve())
        return iv
    if ispec.type == "path":
        problems.add(line, f"{label}: input {name!r}: not found: {p}")
        return iv
    # ref: an artifact id or alias
    iv.value = text
    if workspace is not None and workspace.registry.lookup(text) is None:
        problems.add(line, f"{label}: input {name!r}: not found: {p} is no file or folder, and {text!r} no "
                     "artifact id or alias (paths are relative to the pipeline file)")
    return iv


def _check_blueprint(inputs: dict[str, InputValue], options: dict, problems: _Problems, label: str,
                     line: int) -> None:
    """A bundle step's blueprint loads, and its other inputs and `profiles` name profiles of it."""
    bp_input = inputs.get("blueprint")
    if bp_input is None or bp_input.value is None or not Path(bp_input.value).is_file():
        return
    from slmops.rollout.blueprint import load_blueprint

    try:
        bp = load_blueprint(bp_input.value)
    except BadInputError as exc:
        problems.add(bp_input.line, f"{label}: input 'blueprint': {' '.join(exc.message.split())}")
        return
    for name, iv in inputs.items():
        if name != "blueprint" and name not in bp.profiles:
            problems.add(iv.line, f"{label}: input {name!r} is no profile of the blueprint (profiles: "
                         f"{', '.join(bp.profiles)})")
    wanted = options.get("profiles")
    for p in wanted if isinstance(wanted, list) else []:
        if p not in bp.profiles:
            problems.add(line, f"{label}: options.profiles: no profile {p!r} in the blueprint")


def _placeholder(iv: InputValue) -> str:
    return iv.value if iv.value is not None else iv.text


def _validate_options(kind: str, options: dict, raw_options: dict, inputs: dict[str, InputValue],
                      problems: _Problems, label: str, options_line: int) -> dict[str, Any]:
    """Validate a step's options with its kind's model (inputs filled in where the model has them)."""
    spec = KINDS[kind]
    model = config_model(kind)
    data = copy.deepcopy(options)
    input_fields: set[str] = set()
    if kind == "tune":
        recipe = data.get("recipe")
        if not isinstance(recipe, dict):
            if "recipe" not in data:
                problems.add(options_line, f"{label}: option `recipe` (the fine-tuning recipe, without model and "
                             "data) is required")
            else:
                problems.add(options_line, f"{label}: option `recipe` must be a mapping")
            return {}
        if "recipe_file" in data:
            problems.add(options_line, f"{label}: use the option `recipe:` inline (recipe_file is not supported "
                         "in pipelines)")
            return {}
        for iname in ("model", "data", "val_data"):
            if iname in recipe:
                problems.add(options_line, f"{label}: recipe.{iname} is an input of tune: move it under inputs:")
                return {}
            if iname in inputs:
                recipe[iname] = _placeholder(inputs[iname])
        recipe.setdefault("model", "?")
        recipe.setdefault("data", "?")
    elif spec.config_inputs:
        for iname, iv in inputs.items():
            if iname in model.model_fields:
                data[iname] = _placeholder(iv)
                input_fields.add(iname)
        if kind == "finetune" and "recipe" in inputs:
            data.setdefault("model", "?")
            data.setdefault("data", "?")
    try:
        cfg = model.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            loc = tuple(e["loc"])
            if not loc and "recipe" in inputs:
                continue  # cross-field checks run again with the recipe at run time
            if loc and loc[0] in spec.inputs and e["type"] == "missing":
                msg = f"missing input {loc[0]!r}"
                problems.add(options_line, f"{label}: {msg}")
                continue
            msg = {"extra_forbidden": "unknown option; remove it or check its spelling",
                   "missing": "required option is missing; add it"}.get(e["type"], e["msg"])
            line = _line_of(raw_options, loc) or options_line
            problems.add(line, f"{label}: options.{'.'.join(map(str, loc)) or '(all)'}: {msg}")
        return {}
    dumped = cfg.model_dump(mode="json")
    if kind == "tune":
        for iname in ("model", "data", "val_data"):
            dumped.get("recipe", {}).pop(iname, None)
    for f in input_fields | set(spec.inputs):
        dumped.pop(f, None)
    return dumped


def _cycles(by_name: dict[str, Step]) -> list[list[str]]:
    """Each cycle once (as the list of its steps, starting from the earliest in the file)."""
    color: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    seen_sets: set[frozenset] = set()

    def visit(n: str) -> None:
        color[n] = 1
        stack.append(n)
        for d in by_name[n].deps:
            if d not in by_name:
                continue
            if color.get(d) == 1:
                cyc = stack[stack.index(d):]
                key = frozenset(cyc)
                if key not in seen_sets:
                    seen_sets.add(key)
                    # in data-flow order (each step feeds the next), from the earliest step in the file
                    flow = list(reversed(cyc))
                    i = flow.index(min(flow, key=lambda x: by_name[x].index))
                    found.append(flow[i:] + flow[:i])
            elif color.get(d) is None:
                visit(d)
        stack.pop()
        color[n] = 2

    for n in sorted(by_name, key=lambda x: by_name[x].index):
        if color.get(n) is None:
            visit(n)
    return found


def _topo_order(steps: list[Step]) -> list[Step]:
    """Kahn's algorithm, earliest step in the file first among those ready."""
    by_name = {s.name: s for s in steps}
    done: set[str] = set()
    order: list[Step] = []
    remaining = sorted(steps, key=lambda s: s.index)
    while remaining:
        ready = next(s for s in remaining if all(d in done or d not in by_name for d in s.deps))
        order.append(ready)
        done.add(ready.name)
        remaining.remove(ready)
    return order


# --- fingerprints and keys ---------------------------------------------------------------------------------


def files_digest(files: dict[str, str]) -> str:
    return sha256_text(canonical(files))


def artifact_digest(workspace, ref: str) -> str:
    """The content of an artifact: sha256 over its manifest's file hashes (not its id or metrics)."""
    return files_digest(workspace.manifest(ref).files)


def literal_fingerprint(iv: InputValue, workspace) -> str:
    """The content of a literal input: a file's sha256, a folder's file hashes, an artifact's content."""
    from slmops.workspace import Manifest, hash_folder, sha256_file

    value = iv.value or iv.text
    if value.startswith(("http://", "https://")):
        return "url:" + value
    p = Path(value)
    if p.is_absolute() and p.is_file():
        return "file:" + sha256_file(p)
    if p.is_absolute() and p.is_dir():
        if (p / "slmops.json").is_file():
            return "artifact:" + files_digest(Manifest.read(p).files)
        return "folder:" + files_digest(hash_folder(p))
    return "artifact:" + artifact_digest(workspace, value)


def step_key(step: Step, input_prints: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """(cache key, its parts) from the step's options and its inputs' fingerprints."""
    parts = {"kind": step.kind, "options": sha256_text(canonical(step.options_json)), "inputs": dict(input_prints),
             "slmops": __version__, "format": KEY_FORMAT}
    return sha256_text(canonical(parts)), parts


def why_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why a key differs from the step's previous one: new, options changed, input X changed..."""
    if not old:
        return "new"
    reasons = []
    if old.get("slmops") != new.get("slmops") or old.get("format") != new.get("format"):
        reasons.append(f"slmops version changed ({old.get('slmops')} -> {new.get('slmops')})")
    if old.get("options") != new.get("options") or old.get("kind") != new.get("kind"):
        reasons.append("options changed")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for name in sorted(set(oi) | set(ni)):
        if oi.get(name) != ni.get(name):
            if name.startswith("after:"):
                reasons.append(f"step {name[6:]} changed")
            elif name not in oi:
                reasons.append(f"input {name} added")
            elif name not in ni:
                reasons.append(f"input {name} removed")
            else:
                reasons.append(f"input {name} changed")
    return ", ".join(reasons) or "changed"

"""The ONNX Runtime GenAI engine: an ONNX export (``genai_config.json`` folder) behind the Engine protocol.

Generation runs on onnxruntime-genai's ``Generator`` (its KV cache and batching), but every token is chosen
here: each step reads the batch's next-token logits, picks per request (greedy, or seeded temperature /
top-k / top-p sampling, each request with its own random generator, so a seeded request gives the same
tokens whatever shares its batch), and hands the choice back to the generator as a one-hot logit row
(``set_logits`` + ``generate_next_token``). That keeps per-request sampling, per-token logprobs, stop
strings and streaming on one code path, exactly as in the torch engine. Prompts are right-padded with the
pad token in a batch (onnxruntime-genai masks pad tokens).

Adapters: an export made with ``adapter_mode="runtime"`` has ``.onnx_adapter`` files in ``adapters/``
(listed in ``export.json``); they are loaded under their names, and a batch is split by
``GenerationRequest.adapter`` into generators with that adapter active (``set_active_adapter``). The
export's default adapter (the first given at export) serves requests that name none; "base" gives the
base model.

``logprobs`` and ``token_distributions`` need the logits of every position, which the generator does not
expose: they run the same ``model.onnx`` in a plain ONNX Runtime session (created on first use, with the
LoRA adapter fed through ``RunOptions.add_active_adapter``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slmops.engines.base import (
    BASE_ADAPTER,
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    Logprobs,
    TokenEvent,
    find_stop,
    prompt_too_long,
    refuse_json_schema,
)
from slmops.engines.decoding import (
    JsonMode,
    Row,
    generate_batched,
    json_done,
    log_softmax,
    pick_token,
    stream_request,
)
from slmops.errors import BadInputError

_FROM_EXPORT = object()  # default_adapter: whatever export.json names




def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return str(value or "")



class OrtGenAIEngine(JsonMode):
    name = "ort-genai"

    def __init__(self, path: str | Path, *, max_batch_size: int = 16, threads: int | None = None,
                 adapters: dict[str, str | Path] | None = None, default_adapter: Any = _FROM_EXPORT,
                 workspace=None):
        """`path`: an ONNX export folder (``genai_config.json``). `adapters`: more ``.onnx_adapter`` files to
        load (name -> file) beside the export's own. `default_adapter`: the adapter of requests that name
        none (default: the export's default; None: the base model). `threads`: intra-op threads."""
        try:
            import onnxruntime_genai as og
        except ImportError as e:
            raise BadInputError("the ort-genai engine needs onnxruntime-genai, which is not installed",
                                "pip install 'slmops[export]'") from e
        self._og = og
        self.path = Path(path).expanduser()
        genai_path = self.path / "genai_config.json"
        if not genai_path.is_file():
            raise BadInputError(f"{self.path} is not an ONNX Runtime GenAI folder (no genai_config.json)",
                                "export a model with `slmops export onnx`")
        self.genai_config = _read_json(genai_path)
        self.export_info = _read_json(self.path / "export.json")
        self.threads = threads
        config = og.Config(str(self.path))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        try:
            self.tokenizer.update_options(add_special_tokens="false")  # like the torch engine: text as given
        except Exception:  # noqa: BLE001 - older runtimes: the default (no post-processor for our tokenizers)
            pass
        model_cfg = self.genai_config.get("model", {})
        self.context_length = model_cfg.get("context_length")
        self.vocab_size = model_cfg.get("vocab_size")
        eos = model_cfg.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = model_cfg.get("pad_token_id")
        self.pad_id = int(pad if isinstance(pad, int) else (sorted(self.eos_ids) or [0])[0])
        self.max_batch_size = max_batch_size
        tok_cfg = _read_json(self.path / "tokenizer_config.json")
        template_file = self.path / "chat_template.jinja"
        self.chat_template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                              else tok_cfg.get("chat_template") if isinstance(tok_cfg.get("chat_template"), str) else None)
        self._bos = _token_text(tok_cfg.get("bos_token"))
        self._eos = _token_text(tok_cfg.get("eos_token"))
        self._workspace = workspace
        self._og_adapters = None
        self._adapter_files: dict[str, str] = {}
        self._ort_adapters: dict[str, Any] = {}
        self._slots: dict[str, dict[str, Any]] | None = None
        self._session = None
        self._lock = threading.RLock()
        for name, rel in (self.export_info.get("adapters") or {}).items():
            f = self.path / rel
            if self.export_info.get("adapter_mode") == "runtime" and f.is_file():
                self.load_adapter(name, f)
        for name, f in (adapters or {}).items():
            self.load_adapter(name, f)
        self.default_adapter: str | None = None
        if default_adapter is _FROM_EXPORT:
            default_adapter = self.export_info.get("default_adapter")
            if default_adapter not in self._adapter_files:
                default_adapter = None
        self.set_default_adapter(default_adapter)

    # --- adapters --------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._adapter_files)

    def _lora_slots(self) -> dict[str, dict[str, Any]]:
        if self._slots is None:
            from slmops.export.onnx import read_lora_slots

            self._slots = read_lora_slots(self.path)
        return self._slots

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load an ``.onnx_adapter`` file under `name`; refuses a file whose parameters do not fit this
        export (names or shapes), e.g. one made for another export."""
        import onnxruntime as ort

        from slmops.adapters.core import check_adapter_name

        check_adapter_name(name)
        if name in self._adapter_files:
            raise BadInputError(f"an adapter named {name!r} is already loaded ({self._adapter_files[name]})",
                                "unload_adapter(name) first, or choose another name")
        f = Path(path).expanduser()
        if not f.is_file():
            raise BadInputError(f"no such adapter file: {f}",
                                "ONNX adapters are .onnx_adapter files made by `slmops export onnx --adapter-mode runtime`")
        slots = self._lora_slots()
        if not slots:
            raise BadInputError(f"the export {self.path} has no swappable LoRA branches, so adapter {name!r} cannot "
                                "be applied", "export with --adapter-mode runtime")
        try:
            params = ort.AdapterFormat.read_adapter(str(f)).get_parameters()
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
            raise BadInputError(f"{f} is not an ONNX Runtime adapter file: {e}") from e
        problems = []
        for pname, value in params.items():
            slot = slots.get(pname)
            if slot is None:
                problems.append(f"{pname} has no place in this export")
                continue
            shape = list(value.shape())
            want = slot["rows"] if slot["ab"] == "A" else slot["cols"]
            have = shape[0] if slot["ab"] == "A" else shape[-1]
            if len(shape) != 2 or have != want:
                problems.append(f"{pname} is {shape}, this export needs {want} {'rows' if slot['ab'] == 'A' else 'columns'}")
        if problems:
            raise BadInputError(f"adapter {f} does not fit the export {self.path}: " + "; ".join(problems[:4]),
                                "make adapter files for this export with `slmops export onnx-adapter` / "
                                "export_onnx_adapter()")
        with self._lock:
            if self._og_adapters is None:
                self._og_adapters = self._og.Adapters(self.model)
            self._og_adapters.load(str(f), name)
            self._adapter_files[name] = str(f)

    def unload_adapter(self, name: str) -> None:
        self._adapter_name(name)
        with self._lock:
            self._og_adapters.unload(name)
            del self._adapter_files[name]
            self._ort_adapters.pop(name, None)
        if self.default_adapter == name:
            self.default_adapter = None

    def set_default_adapter(self, name: str | None) -> None:
        self.default_adapter = None if name in (None, BASE_ADAPTER) else self._adapter_name(name)

    def _adapter_name(self, name: str) -> str:
        if name not in self._adapter_files:
            loaded = ", ".join(self._adapter_files) or "none"
            raise BadInputError(f"no adapter named {name!r} is loaded (loaded: {loaded})",
                                f"use one of the loaded adapters, or {BASE_ADAPTER!r} for the base model")
        return name

    def resolve_adapter(self, name: str | None) -> str | None:
        if name is None:
            return self.default_adapter
        if name == BASE_ADAPTER:
            return None
        return self._adapter_name(name)

    # --- protocol --------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        from slmops.export.onnx import model_bytes

        providers = (self.genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
                     .get("provider_options") or [])
        device = next(iter(providers[0]), "cpu") if providers and isinstance(providers[0], dict) else "cpu"
        extra: dict[str, Any] = {"execution_provider": self.export_info.get("execution_provider", device),
                                 "bos_token": self._bos, "eos_token": self._eos}
        if self._adapter_files:
            extra.update(adapters=dict(self._adapter_files), default_adapter=self.default_adapter,
                         adapter_bytes={n: Path(f).stat().st_size for n, f in self._adapter_files.items()})
        return EngineInfo(
            name=self.name, format="onnx", precision=self.export_info.get("precision", "unknown"),
            parameters=self.export_info.get("parameters"), bytes_on_disk=model_bytes(self.path), device=device,
            path=str(self.path), context_length=self.context_length, vocab_size=self.vocab_size,
            chat_template=self.chat_template, extra=extra,
        )

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        if not self.chat_template:
            raise BadInputError(f"the export {self.path} has no chat template, so chat messages cannot be rendered",
                                "pass a raw prompt, or export a model whose tokenizer has a chat template")
        from slmops.models.templates import render_chat_template

        return render_chat_template(self.chat_template, request.messages, add_generation_prompt=True,
                                    bos_token=self._bos, eos_token=self._eos)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request, in batches of `max_batch_size` (grouped by adapter, then by prompt
        length)."""
        return generate_batched(self, requests)

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        return stream_request(self, request)

    def logprobs(self, texts: list[str], adapter: str | None = None) -> list[Logprobs]:
        """log p(token_i | tokens<i) for each text (no special tokens added), under `adapter`."""
        out = []
        for text, dist in zip(texts, self.token_distributions(texts, adapter=adapter), strict=True):
            ids = self.tokenize(text)
            vals: list[float | None] = [None] + [float(dist[i, ids[i + 1]]) for i in range(len(ids) - 1)]
            out.append(Logprobs(token_ids=ids, tokens=[self.decode([i]) for i in ids], logprobs=vals[: len(ids)]))
        return out

    def token_distributions(self, texts: list[str], adapter: str | None = None) -> list:
        """Next-token log-distributions: a float32 array ``[T, V]`` per text of T tokens (row i: log p(. |
        tokens 0..i)), from one forward pass of the whole text through ``model.onnx``."""
        import numpy as np

        name = self.resolve_adapter(adapter)
        out = []
        for text in texts:
            ids = self.tokenize(text)
            if not ids:
                out.append(np.zeros((0, self.vocab_size or 0), dtype=np.float32))
                continue
            logits = self._forward_all(ids, name)
            out.append(log_softmax(logits).astype(np.float32))
        return out

    def close(self) -> None:
        self._session = None
        self._ort_adapters = {}
        self._og_adapters = None
        self.tokenizer = None
        self.model = None

    # --- internals -------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Row:
        import numpy as np

        refuse_json_schema(self.name, request)
        ids = self.tokenize(self.render(request))
        if not ids:
            raise BadInputError("the prompt is empty after tokenization")
        if self.context_length and len(ids) >= self.context_length:
            raise prompt_too_long(len(ids), self.context_length)
        rng = np.random.default_rng(request.seed) if request.temperature > 0 else None
        return Row(request=request, prompt_ids=ids, rng=rng)

    def _decode_one(self, token_id: int) -> str:
        return self.decode([token_id])

    def _is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_ids

    def _advance(self, row: Row, tok: int, lp: float, now: float) -> None:
        row.t_first = row.t_first or now
        row.t_last = now
        if tok in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.ids.append(tok)
        row.logprobs.append(lp)
        row.text = self.decode(row.ids)
        cut = find_stop(row.text, row.request.stop)
        if cut is not None:
            row.text = row.text[:cut]
            row.finish_reason = "stop"
        elif json_done(row):
            row.finish_reason = "stop"
        elif len(row.ids) >= row.request.max_new_tokens:
            row.finish_reason = "length"

    def decode_batch(self, rows: list[Row], adapter: str | None = None) -> Iterator[None]:
        """Run prepared rows (see `prepare`) to completion as one batch with `adapter` (a name from
        `resolve_adapter`), yielding after every decode step (static batching: no joining mid-flight)."""
        return self._steps(rows, adapter)

    def _steps(self, rows: list[Row], adapter: str | None = None) -> Iterator[None]:
        """Run the batch to completion with `adapter` (None: base model), yielding after every token."""
        import numpy as np

        og = self._og
        width = max(len(r.prompt_ids) for r in rows)
        max_length = width + max(r.request.max_new_tokens for r in rows)
        if self.context_length:
            max_length = min(max_length, int(self.context_length))
        with self._lock:
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=max_length, batch_size=len(rows), do_sample=False,
                                      repetition_penalty=1.0, min_length=0)
            gen = og.Generator(self.model, params)
            if adapter is not None:
                gen.set_active_adapter(self._og_adapters, adapter)
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for i, r in enumerate(rows):  # right padding: onnxruntime-genai masks the pad tokens
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
        gen.append_tokens(tokens)
        length = width
        while True:
            logits = np.asarray(gen.get_logits())[:, -1, :].astype(np.float32)
            now = time.perf_counter()
            chosen = []
            for i, r in enumerate(rows):
                if r.finish_reason:
                    chosen.append(self.pad_id)
                    continue
                tok, lp = pick_token(r.request, logits[i], r.rng, r.ids, r.top, self._allowed(r, logits[i]))
                self._advance(r, tok, lp, now)
                chosen.append(tok)
            if length + 1 >= max_length:  # the context is full: nothing more fits
                for r in rows:
                    r.finish_reason = r.finish_reason or "length"
            yield
            if all(r.finish_reason for r in rows):
                return
            forced = np.full((len(rows), 1, logits.shape[-1]), -1e9, dtype=np.float32)
            for i, tok in enumerate(chosen):
                forced[i, 0, tok] = 0.0
            gen.set_logits(forced)
            gen.generate_next_token()
            length += 1

    def _ort_session(self):
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3  # the LoRA inputs' defaults are initializers on purpose: no warning per input
            if self.threads:
                so.intra_op_num_threads = int(self.threads)
                so.inter_op_num_threads = 1
            decoder = self.genai_config.get("model", {}).get("decoder", {})
            self._session = ort.InferenceSession(str(self.path / decoder.get("filename", "model.onnx")), so,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def _ort_adapter(self, name: str):
        if name not in self._ort_adapters:
            import onnxruntime as ort

            a = ort.LoraAdapter()
            a.Load(self._adapter_files[name])
            self._ort_adapters[name] = a
        return self._ort_adapters[name]

    def _forward_all(self, ids: list[int], adapter: str | None):
        """Logits [T, V] (float32) of every position of `ids`, from an empty cache."""
        import numpy as np
        import onnxruntime as ort

        sess = self._ort_session()
        decoder = self.genai_config.get("model", {}).get("decoder", {})
        names = decoder.get("inputs", {})
        head = int(decoder.get("head_size") or decoder.get("hidden_size", 0) // max(1, decoder.get("num_attention_heads", 1)))
        kv_heads = int(decoder.get("num_key_value_heads") or decoder.get("num_attention_heads", 1))
        n = len(ids)
        feeds: dict[str, Any] = {names.get("input_ids", "input_ids"): np.array([ids], dtype=np.int64)}
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        for inp in sess.get_inputs():
            if inp.name == names.get("attention_mask", "attention_mask"):
                feeds[inp.name] = np.ones((1, n), dtype=np.int64)
            elif inp.name == names.get("position_ids", "position_ids"):
                feeds[inp.name] = np.arange(n, dtype=np.int64)[None]
            elif inp.name.startswith(("past_key_values", "past.")):
                feeds[inp.name] = np.zeros((1, kv_heads, 0, head), dtype=types.get(inp.type, np.float32))
        run_options = ort.RunOptions()
        if adapter is not None:
            run_options.add_active_adapter(self._ort_adapter(adapter))
        out_name = decoder.get("outputs", {}).get("logits", "logits")
        logits = sess.run([out_name], feeds, run_options)[0]
        return np.asarray(logits[0], dtype=np.float32)


__all__ = ["OrtGenAIEngine"]

"""The llama.cpp engine: a GGUF model run through llama-cpp-python, behind the Engine protocol.

The model and context come from ``llama_cpp.Llama``; decoding is our own loop over llama.cpp's C API
(``llama_decode`` on one sequence, logits of the last position), so that sampling, per-request seeds, stop
strings, streaming and logprobs behave exactly as in the torch engine:

* greedy is the arg-max of llama.cpp's logits; sampling (temperature, top-k, top-p) draws from them with a
  numpy generator seeded per request, so a seeded request gives the same tokens whatever else runs;
* generation ends at llama.cpp's end-of-generation tokens (``llama_vocab_is_eog``: eos, eot, <|im_end|>,
  ...), at a stop string (held back while streaming until it cannot match) or after ``max_new_tokens``;
* a batch of requests runs one request after another (llama.cpp on CPU gains little from batching small
  models, and one sequence keeps the KV cache simple); the KV cache is reused only by the request that
  filled it, so a request's output never depends on what ran before it, and interleaved streams re-evaluate
  their own tokens when they take turns;
* ``logprobs`` and ``token_distributions`` evaluate a text with logits at every position (for perplexity
  and the KL divergence of parity checks).

Adapters are GGUF LoRA files (``convert_lora_to_gguf.py`` output, what ``slmops export gguf --adapter-mode
lora`` writes), loaded with ``llama_adapter_lora_init`` and switched per request with
``llama_set_adapters_lora`` (no reload; the KV cache is rebuilt).

Prompts are rendered with the source tokenizer's chat template when one is given (``tokenizer=``), else
with the chat template stored in the GGUF (``tokenizer.chat_template``), through the same Jinja sandbox
transformers uses. Text is tokenized without adding BOS (as the torch engine does: templates write it).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import time
import weakref
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
from slmops.errors import BadInputError, SlmopsError

DEFAULT_MAX_CTX = 4096
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free llama.cpp models before interpreter teardown (llama-cpp-python's own finalizers fail then)."""
    for engine in list(_LIVE):
        try:
            engine.close()
        except Exception:  # noqa: BLE001
            pass




def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None



class LlamaCppEngine(JsonMode):
    name = "llama.cpp"
    max_batch_size = 1  # one sequence per llama.cpp context

    def __init__(self, path: str | Path, *, tokenizer: Any = None, n_ctx: int | None = None,
                 threads: int | None = None, n_batch: int = 512, adapters: dict[str, str | Path] | None = None,
                 default_adapter: str | None = None, lora_scale: float = 1.0, workspace=None, **unused: Any):
        """Open the GGUF file at `path`.

        `tokenizer`: a Hugging Face tokenizer (or its folder) whose chat template renders chat messages (the
        GGUF's own template otherwise). `n_ctx`: context size (default: the model's, at most 4096).
        `threads`: CPU threads (default: half the cores for decoding, all for prompt batches). `adapters`:
        name -> GGUF LoRA file; `default_adapter`: the adapter of requests that name none."""
        from slmops.export.llamacpp import capture_llama_log, quiet_llama_log, require_llama_cpp

        if unused:
            raise BadInputError(f"the llama.cpp engine does not take option(s) {', '.join(sorted(unused))}")
        llama_cpp = require_llama_cpp()
        quiet_llama_log()
        self._lc = llama_cpp
        self.path = str(Path(path).expanduser())
        p = Path(self.path)
        if not p.is_file():
            raise BadInputError(f"no such GGUF file: {p}")
        self._workspace = workspace
        cores = os.cpu_count() or 1
        # llama.cpp's own defaults: half the cores for decoding (its threads spin while they wait, which costs a
        # lot on a busy machine), all of them for prompt/scoring batches; `threads` sets both
        n_threads, n_threads_batch = (threads, threads) if threads else (max(1, cores // 2), cores)
        with capture_llama_log() as cap:
            try:
                probe = llama_cpp.Llama(model_path=self.path, vocab_only=True, verbose=False)
            except (ValueError, RuntimeError) as e:
                raise self._load_error(p, cap, e) from e
            meta = dict(probe.metadata or {})
            n_ctx_train = _int(meta.get(f"{meta.get('general.architecture')}.context_length")) or 0
            probe.close()
            ctx = n_ctx or min(n_ctx_train or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
            try:
                self._llm = llama_cpp.Llama(model_path=self.path, n_ctx=ctx, n_batch=min(n_batch, ctx),
                                            n_ubatch=min(n_batch, ctx), n_threads=n_threads,
                                            n_threads_batch=n_threads_batch,
                                            logits_all=False, verbose=False)
            except (ValueError, RuntimeError) as e:
                raise self._load_error(p, cap, e) from e
        self.n_ctx = ctx
        self.metadata: dict[str, str] = dict(self._llm.metadata or {})
        arch = self.metadata.get("general.architecture")
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._llm.model)) or n_ctx_train
        self.context_length = n_ctx_train or _int(self.metadata.get(f"{arch}.context_length"))
        self.n_batch = min(n_batch, ctx)
        self._model = self._llm.model
        self._ctx = self._llm.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(self._llm.n_vocab())
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._lock = threading.RLock()
        self._kv_owner: object | None = None  # the row (or scoring call) whose tokens are in the KV cache
        self._kv_tokens: list[int] = []
        self._kv_adapter: str | None = None
        self._closed = False
        _LIVE.add(self)
        # tokenizer for chat templates
        self.tokenizer = None
        if tokenizer is not None:
            if isinstance(tokenizer, str | Path):
                from slmops.models.load import load_tokenizer

                tokenizer = load_tokenizer(str(tokenizer))
            self.tokenizer = tokenizer
        # adapters
        self._adapters: dict[str, Any] = {}
        self._adapter_paths: dict[str, str] = {}
        self._active: str | None = None
        self.lora_scale = float(lora_scale)
        self.default_adapter: str | None = None
        for name, apath in (adapters or {}).items():
            self.load_adapter(name, apath)
        if default_adapter is not None:
            self.set_default_adapter(default_adapter)

    def _load_error(self, p: Path, cap, e: Exception) -> SlmopsError:
        kind = None
        try:
            from slmops.export.llamacpp import read_gguf_metadata

            kind = read_gguf_metadata(p, ("general.type",)).get("general.type")
        except Exception:  # noqa: BLE001 - best effort: the load error below is what matters
            kind = None
        if kind == "adapter":
            return BadInputError(f"{p} is a GGUF LoRA adapter, not a model",
                                 "open its base model and pass adapters={name: file} (or --adapter NAME=FILE)")
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            return BadInputError(f"{p} is not a GGUF file")
        return SlmopsError(f"llama.cpp could not load {p}: {e}", "llama.cpp says:\n" + cap.tail())

    # --- adapters --------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._adapter_paths)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a GGUF LoRA adapter file under `name`. Refuses adapters llama.cpp finds do not fit the model
        (other architecture or tensor shapes) with llama.cpp's reason."""
        from slmops.adapters.core import check_adapter_name, is_adapter_folder
        from slmops.export.llamacpp import capture_llama_log, read_gguf_metadata

        check_adapter_name(name)
        if name in self._adapter_paths:
            raise BadInputError(f"an adapter named {name!r} is already loaded ({self._adapter_paths[name]})")
        p = Path(path).expanduser()
        if is_adapter_folder(p):
            raise BadInputError(f"{p} is a PEFT adapter folder; the llama.cpp engine loads GGUF LoRA files",
                                "convert it with `slmops export gguf --model BASE --adapter DIR --adapter-mode lora`")
        if not p.is_file():
            raise BadInputError(f"no such adapter file: {p}")
        meta = read_gguf_metadata(p, ("general.type", "general.architecture", "adapter.type"))
        if meta.get("general.type") != "adapter":
            raise BadInputError(f"{p} is not a GGUF LoRA adapter (general.type is {meta.get('general.type')!r})")
        arch = self.metadata.get("general.architecture")
        if meta.get("general.architecture") and arch and meta["general.architecture"] != arch:
            raise BadInputError(f"adapter {p} is for architecture {meta['general.architecture']}, this model is {arch}")
        with self._lock, capture_llama_log() as cap:
            handle = self._lc.llama_adapter_lora_init(self._model, str(p).encode("utf-8"))
        if not handle:
            raise BadInputError(f"adapter {p} does not fit this model ({self.path})",
                                "llama.cpp says:\n" + (cap.tail(6) or "(nothing)"))
        self._adapters[name] = handle
        self._adapter_paths[name] = str(p.resolve())

    def unload_adapter(self, name: str) -> None:
        self._adapter_name(name)
        with self._lock:
            if self._active == name:
                self._set_active(None)
            handle = self._adapters.pop(name)
            del self._adapter_paths[name]
            self._lc.llama_adapter_lora_free(handle)
            self._invalidate()
        if self.default_adapter == name:
            self.default_adapter = None

    def set_default_adapter(self, name: str | None) -> None:
        self.default_adapter = None if name in (None, BASE_ADAPTER) else self._adapter_name(name)

    def _adapter_name(self, name: str) -> str:
        if name not in self._adapter_paths:
            loaded = ", ".join(self._adapter_paths) or "none"
            raise BadInputError(f"no adapter named {name!r} is loaded (loaded: {loaded})",
                                f"use one of the loaded adapters, {BASE_ADAPTER!r} for the base model, or load it first")
        return name

    def resolve_adapter(self, name: str | None) -> str | None:
        if name is None:
            return self.default_adapter
        if name == BASE_ADAPTER:
            return None
        return self._adapter_name(name)

    def _set_active(self, name: str | None) -> None:
        if name == self._active:
            return
        if name is None:
            rc = self._lc.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            arr = (self._lc.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            scales = (ctypes.c_float * 1)(self.lora_scale)
            rc = self._lc.llama_set_adapters_lora(self._ctx, arr, 1, scales)
        if rc != 0:
            raise SlmopsError(f"llama.cpp could not switch to adapter {name!r} (code {rc})")
        self._active = name
        self._invalidate()

    # --- protocol --------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        from slmops.export.llamacpp import FILE_TYPE_NAMES

        ftype = self.metadata.get("general.file_type")
        try:
            precision = FILE_TYPE_NAMES.get(int(ftype), f"ftype-{ftype}") if ftype is not None else "unknown"
        except ValueError:
            precision = str(ftype)
        extra: dict[str, Any] = {"architecture": self.metadata.get("general.architecture"),
                                 "pre_tokenizer": self.metadata.get("tokenizer.ggml.pre"), "n_ctx": self.n_ctx}
        if self._adapter_paths:
            extra.update(adapters=dict(self._adapter_paths), default_adapter=self.default_adapter,
                         adapter_bytes={n: Path(p).stat().st_size for n, p in self._adapter_paths.items()})
        return EngineInfo(
            name=self.name, format="gguf", precision=precision,
            parameters=int(self._lc.llama_model_n_params(self._model)),
            bytes_on_disk=Path(self.path).stat().st_size, device="cpu", path=self.path,
            context_length=self.context_length, vocab_size=self.n_vocab, chat_template=self.chat_template, extra=extra,
        )

    @property
    def chat_template(self) -> str | None:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.chat_template
        return self.metadata.get("tokenizer.chat_template")

    def token_text(self, token_id: int) -> str:
        raw = self._lc.llama_vocab_get_text(self._vocab, int(token_id))
        return raw.decode("utf-8", errors="replace") if raw else ""

    def _special_text(self, key: str) -> str:
        tid = self.metadata.get(key)
        if tid is None:
            return ""
        try:
            return self.token_text(int(tid))
        except (ValueError, TypeError):
            return ""

    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def detokenize(self, ids: list[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def render(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise BadInputError(f"{self.path} has no chat template, so chat messages cannot be rendered",
                                "pass a raw prompt, or open the engine with tokenizer=<the source model folder>")
        from slmops.models.templates import render_chat_template

        return render_chat_template(template, request.messages, add_generation_prompt=True,
                                    bos_token=self._special_text("tokenizer.ggml.bos_token_id"),
                                    eos_token=self._special_text("tokenizer.ggml.eos_token_id"))

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Every request, one after another (one sequence per context)."""
        return generate_batched(self, requests)

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        return stream_request(self, request)

    def logprobs(self, texts: list[str], adapter: str | None = None) -> list[Logprobs]:
        """log p(token_i | tokens<i) for each text (no BOS added), under `adapter`."""
        import numpy as np

        name = self.resolve_adapter(adapter)
        out = []
        for text in texts:
            ids = self.tokenize(text)
            vals: list[float | None] = [None]
            if len(ids) > 1:
                for start, logits in self._score(ids, name):
                    lp = log_softmax(logits)
                    nxt = ids[start + 1: start + 1 + len(logits)]
                    vals.extend(float(x) for x in lp[np.arange(len(nxt)), nxt])
            out.append(Logprobs(token_ids=ids, tokens=[self.token_text(i) for i in ids], logprobs=vals[: len(ids)]))
        return out

    def token_distributions(self, texts: list[str], adapter: str | None = None) -> list[Any]:
        """For each text, a float32 numpy array [T, V]: row i is log p(. | tokens[:i+1]) (T tokens, no BOS)."""
        import numpy as np

        name = self.resolve_adapter(adapter)
        out = []
        for text in texts:
            ids = self.tokenize(text)
            if not ids:
                out.append(np.zeros((0, self.n_vocab), dtype=np.float32))
                continue
            parts = [log_softmax(logits).astype(np.float32) for _, logits in self._score(ids, name)]
            out.append(np.concatenate(parts, axis=0))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for handle in self._adapters.values():
                try:
                    self._lc.llama_adapter_lora_free(handle)
                except Exception:  # noqa: BLE001
                    pass
            self._adapters = {}
            self._lc.llama_batch_free(self._batch)
            self._llm.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # --- internals -------------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._kv_owner = None
        self._kv_tokens = []

    def _decode(self, tokens: list[int], n_past: int, all_logits: bool):
        """Evaluate `tokens` at positions n_past.. in chunks; yields (offset, logits [n, V]) per chunk (only the
        last position's row unless `all_logits`)."""
        import numpy as np

        b = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            n = len(chunk)
            b.n_tokens = n
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = n_past + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or i == n - 1
            rc = self._lc.llama_decode(self._ctx, b)
            if rc != 0:
                self._invalidate()
                raise SlmopsError(f"llama.cpp could not evaluate {n} tokens at position {n_past + start} (code {rc})",
                                  f"the context holds {self.n_ctx} tokens: open the engine with a larger n_ctx")
            if all_logits:
                ptr = self._lc.llama_get_logits(self._ctx)
                arr = np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()
                yield start, arr
            elif start + n == len(tokens):
                ptr = self._lc.llama_get_logits_ith(self._ctx, n - 1)
                yield start, np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()[None, :]

    def _eval(self, owner: object, tokens: list[int], adapter: str | None):
        """Logits [V] after `tokens`, reusing the KV cache when it holds a prefix written by `owner`."""
        with self._lock:
            self._set_active(adapter)
            keep = 0
            if self._kv_owner is owner and self._kv_adapter == adapter:
                kv = self._kv_tokens
                while keep < min(len(kv), len(tokens) - 1) and kv[keep] == tokens[keep]:
                    keep += 1
            mem = self._lc.llama_get_memory(self._ctx)
            if keep == 0:
                self._lc.llama_memory_clear(mem, True)
            else:
                self._lc.llama_memory_seq_rm(mem, 0, keep, -1)
            self._kv_owner, self._kv_adapter, self._kv_tokens = owner, adapter, list(tokens)
            last = None
            for _, logits in self._decode(tokens[keep:], keep, all_logits=False):
                last = logits
            return last[0]

    def _score(self, ids: list[int], adapter: str | None):
        """(offset, log-prob-able logits [n, V]) chunks for every position of `ids` (a fresh KV cache)."""
        if len(ids) > self.n_ctx:
            raise BadInputError(f"text is {len(ids)} tokens, the context holds {self.n_ctx}",
                                "open the engine with a larger n_ctx, or shorten the text")
        with self._lock:
            self._set_active(adapter)
            self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)
            self._invalidate()
            chunks = list(self._decode(ids, 0, all_logits=True))
        return chunks

    def prepare(self, request: GenerationRequest) -> Row:
        import numpy as np

        ids = self.tokenize(self.render(request))
        if not ids:
            raise BadInputError("the prompt is empty after tokenization")
        if len(ids) >= self.n_ctx:
            raise BadInputError(f"prompt is {len(ids)} tokens, the context holds {self.n_ctx}", "shorten the prompt")
        rng = None
        if request.temperature > 0:
            rng = np.random.default_rng(request.seed)
        row = Row(request=request, prompt_ids=ids, rng=rng)
        if request.json_schema is not None:
            row.grammar = self._schema_grammar(request.json_schema)
        return row

    supports_json_schema = True

    def _schema_grammar(self, schema: dict) -> _Grammar:
        """llama.cpp's grammar sampler for `schema` (llama-cpp-python converts the schema to GBNF)."""
        import json

        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions on bad schemas
            raise BadInputError(f"the JSON schema cannot be turned into a grammar: {exc}",
                                "check the schema (types, properties, $ref targets)") from None
        sampler = self._lc.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise BadInputError("llama.cpp could not compile the grammar of this JSON schema")
        return _Grammar(self._lc, sampler, self.n_vocab)

    def _allowed(self, row: Row, logits):
        grammar = getattr(row, "grammar", None)
        if grammar is not None:
            return grammar.allowed(logits)
        return super()._allowed(row, logits)

    def _decode_one(self, token_id: int) -> str:
        return self.detokenize([token_id])

    def _is_eos(self, token_id: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token_id))

    def _advance(self, row: Row, tok: int, lp: float, now: float) -> None:
        row.t_first = row.t_first or now
        row.t_last = now
        if self._lc.llama_vocab_is_eog(self._vocab, tok):
            row.finish_reason = "stop"
            return
        row.ids.append(tok)
        row.logprobs.append(lp)
        row.text = self.detokenize(row.ids)
        cut = find_stop(row.text, row.request.stop)
        if cut is not None:
            row.text = row.text[:cut]
            row.finish_reason = "stop"
        elif json_done(row):
            row.finish_reason = "stop"
        elif len(row.ids) >= row.request.max_new_tokens:
            row.finish_reason = "length"
        elif len(row.prompt_ids) + len(row.ids) >= self.n_ctx:
            row.finish_reason = "length"

    def decode_batch(self, rows: list[Row], adapter: str | None = None) -> Iterator[None]:
        """Run one prepared row (see `prepare`) to completion with `adapter`, yielding after every token.
        One sequence per context: `max_batch_size` is 1, so schedulers run requests one after another."""
        if len(rows) != 1:
            raise ValueError("the llama.cpp engine decodes one request at a time")
        return self._steps(rows[0], adapter)

    def _steps(self, row: Row, adapter: str | None) -> Iterator[None]:
        """Decode `row` to completion, yielding after every token."""
        while not row.finish_reason:
            logits = self._eval(row, row.prompt_ids + row.ids, adapter)
            tok, lp = pick_token(row.request, logits, row.rng, row.ids, row.top, self._allowed(row, logits))
            grammar = getattr(row, "grammar", None)
            if grammar is not None:
                grammar.accept(tok)
            self._advance(row, tok, lp, time.perf_counter())
            yield


class _Grammar:
    """A llama.cpp grammar sampler for one request: which tokens may come next, and the chosen one."""

    def __init__(self, lc, sampler, n_vocab: int):
        from llama_cpp._internals import LlamaTokenDataArray

        self._lc, self._sampler = lc, sampler
        self._cands = LlamaTokenDataArray(n_vocab=n_vocab)
        self._finalizer = weakref.finalize(self, lc.llama_sampler_free, sampler)

    def allowed(self, logits) -> list[int]:
        import numpy as np

        self._cands.copy_logits(np.asarray(logits, dtype=np.single))
        self._lc.llama_sampler_apply(self._sampler, ctypes.byref(self._cands.candidates))
        data = self._cands.candidates_data
        keep = np.isfinite(data.logit)
        return data.id[keep].tolist()

    def accept(self, token: int) -> None:
        self._lc.llama_sampler_accept(self._sampler, token)


__all__ = ["LlamaCppEngine"]

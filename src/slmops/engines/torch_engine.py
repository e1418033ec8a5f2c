"""The PyTorch engine: a Hugging Face causal LM run by our own batched decode loop.

Batched greedy and sampled generation with left padding and a KV cache, per-request seeds (reproducible
whatever else is in the batch), stop strings, token streaming and per-token logprobs. The loop is ours
(not `model.generate`) so that streaming, stop strings and per-request sampling share one code path; a
test checks it matches `transformers.generate` token for token.

Adapters: several PEFT adapters (e.g. LoRA) can sit on one base (`adapters={name: folder}`,
`load_adapter`, `unload_adapter`). The model is wrapped in a PeftModel on the first one; a batch is split
into groups by `GenerationRequest.adapter`, and each group runs with its adapter active (switching is a
flag flip, about a millisecond) or with every adapter off for the base model.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

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
    penalty_counts,
    stream_request,
)
from slmops.errors import BadInputError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class TorchEngine(JsonMode):
    name = "torch"
    _UNKNOWN = "\0unknown"  # `_active` when PEFT's active adapter is not known (after a load or unload)

    def __init__(self, path: str | Path | None = None, *, model=None, tokenizer=None, dtype: str = "float32",
                 device: str = "cpu", max_batch_size: int = 16, threads: int | None = None,
                 adapters: dict[str, str] | None = None, default_adapter: str | None = None, workspace=None):
        """`adapters`: name -> adapter folder, loaded on top of the model. `default_adapter`: the adapter of
        requests that name none (default: none, the base model). `workspace` lets adapter checks find an
        adapter artifact's registered base."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        if dtype not in DTYPES:
            raise BadInputError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
        self.path = str(path) if path is not None else ""
        if model is None or tokenizer is None:
            from slmops.models.load import load_model, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(str(path))
            model = model or load_model(str(path), dtype=DTYPES[dtype], device=device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = DTYPES[dtype]
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = set()
        for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list | tuple):
                eos.update(src)
        self.eos_ids = eos
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self._workspace = workspace
        self._peft = None  # the PeftModel wrapping self.model once an adapter is loaded
        self._adapter_paths: dict[str, str] = {}
        # name -> the name inside PEFT (adapter names become module keys there: no dots, and PEFT misloads
        # names that are part of its "lora_" prefix, such as "a"), so any valid name works here
        self._peft_names: dict[str, str] = {}
        self._loads = 0
        self._active: str | None = None  # the adapter the model runs with now; None: all adapters off
        self._lock = threading.RLock()  # adapter switches + forwards, when adapters are loaded
        self.default_adapter: str | None = None
        for name, adapter_path in (adapters or {}).items():
            self.load_adapter(name, adapter_path)
        if default_adapter is not None:
            self.set_default_adapter(default_adapter)

    # --- adapters --------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order."""
        return list(self._adapter_paths)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the PEFT adapter folder `path` under `name` (the active one is chosen per request).

        Raises ``BadInputError`` for a taken or invalid name, a folder that is not an adapter, or an adapter
        that does not fit this model (other architecture or sizes)."""
        from slmops.adapters.core import attach_adapter, check_adapter_name, read_adapter

        check_adapter_name(name)
        if name in self._adapter_paths:
            raise BadInputError(f"an adapter named {name!r} is already loaded ({self._adapter_paths[name]})",
                                "unload_adapter(name) first, or choose another name")
        info = read_adapter(path)
        with self._lock:
            self._loads += 1
            peft_name = f"slmops_adapter{self._loads}"
            self._peft = attach_adapter(self.model, info, peft_name, peft_model=self._peft, workspace=self._workspace)
            self._peft.eval()
            self._adapter_paths[name] = str(info.path)
            self._peft_names[name] = peft_name
            self._active = self._UNKNOWN  # from_pretrained/load_adapter may have changed what is active

    def unload_adapter(self, name: str) -> None:
        """Remove adapter `name`; after the last one the model is the plain base model again."""
        self._adapter_name(name)
        with self._lock:
            with warnings.catch_warnings():  # "adapter ... was active which is now deleted": we re-activate
                warnings.simplefilter("ignore")
                self._peft.delete_adapter(self._peft_names.pop(name))
            del self._adapter_paths[name]
            self._active = self._UNKNOWN
            if not self._adapter_paths:
                self.model = self._peft.unload()  # take the adapter layers out: the original modules again
                self._peft = None
                self._active = None
        if self.default_adapter == name:
            self.default_adapter = None

    def set_default_adapter(self, name: str | None) -> None:
        """The adapter used by requests whose `adapter` is None (None: the base model)."""
        self.default_adapter = None if name in (None, BASE_ADAPTER) else self._adapter_name(name)

    def _adapter_name(self, name: str) -> str:
        if name not in self._adapter_paths:
            loaded = ", ".join(self._adapter_paths) or "none"
            raise BadInputError(f"no adapter named {name!r} is loaded (loaded: {loaded})",
                                f"use one of the loaded adapters, {BASE_ADAPTER!r} for the base model, or load it "
                                "first (load_adapter / --adapter NAME=DIR)")
        return name

    def resolve_adapter(self, name: str | None) -> str | None:
        """The adapter a request naming `name` runs with (None: the base model); BadInputError for an
        unknown name."""
        if name is None:
            return self.default_adapter
        if name == BASE_ADAPTER:
            return None
        return self._adapter_name(name)

    def _activate(self, name: str | None) -> None:
        """Make the model run with adapter `name` (None: every adapter off). Cheap when nothing changes."""
        if self._peft is None or self._active == name:
            return
        lora = self._peft.base_model
        if name is None:
            lora.disable_adapter_layers()
        else:
            if self._active is None or self._active == self._UNKNOWN:
                lora.enable_adapter_layers()
            self._peft.set_adapter(self._peft_names[name], inference_mode=True)
        self._active = name

    def _forward(self, adapter: str | None, **kw):
        if self._peft is None:
            return self.model(**kw)
        with self._lock:
            self._activate(adapter)
            return self.model(**kw)

    # --- protocol --------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        from slmops.models.presets import count_parameters

        size = None
        if self.path and Path(self.path).is_dir():
            size = sum(p.stat().st_size for p in Path(self.path).glob("*")
                       if p.suffix in (".safetensors", ".bin", ".pt"))
        params = count_parameters(self.model)
        extra = {}
        if self._adapter_paths:
            sizes = {n: 0 for n in self._adapter_paths}
            for pname, p in self.model.named_parameters():
                for n in sizes:
                    if f".{self._peft_names[n]}." in pname:
                        sizes[n] += p.numel()
            params -= sum(sizes.values())
            extra = {"adapters": dict(self._adapter_paths), "adapter_parameters": sizes,
                     "default_adapter": self.default_adapter}
        return EngineInfo(
            name=self.name, format="hf", precision={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype],
            parameters=params, bytes_on_disk=size, device=self.device, path=self.path,
            context_length=self.context_length, vocab_size=self.model.config.vocab_size,
            chat_template=getattr(self.tokenizer, "chat_template", None), extra=extra,
        )

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, request: GenerationRequest) -> str:
        """The exact prompt text: messages through the model's chat template, or the raw prompt."""
        if request.prompt is not None:
            return request.prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadInputError(
                f"model {self.path or '(in memory)'} has no chat template, so chat messages cannot be rendered",
                "pass a raw prompt, or add a chat template to the tokenizer (slmops models create does)",
            )
        return self.tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request, in batches of `max_batch_size` (grouped by adapter, then by prompt
        length)."""
        return generate_batched(self, requests)

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        return stream_request(self, request)

    def logprobs(self, texts: list[str], batch_size: int = 8, adapter: str | None = None) -> list[Logprobs]:
        """log p(token_i | tokens<i) for each text (no special tokens added), under `adapter` (the same
        meaning as `GenerationRequest.adapter`)."""
        import torch

        name = self.resolve_adapter(adapter)
        out: list[Logprobs] = []
        for start in range(0, len(texts), batch_size):
            enc = [self.tokenize(t) for t in texts[start:start + batch_size]]
            width = max(1, max(len(e) for e in enc))
            ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
            att = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
                att[i, : len(e)] = 1
            with torch.inference_mode():
                logits = self._forward(name, input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
            for i, e in enumerate(enc):
                vals: list[float | None] = [None] + [float(x) for x in lp[i, : max(0, len(e) - 1)]]
                out.append(Logprobs(token_ids=e, tokens=self.tokenizer.convert_ids_to_tokens(e),
                                    logprobs=vals[: len(e)]))
        return out

    def token_distributions(self, texts: list[str], adapter: str | None = None) -> list:
        """Next-token log-distributions for each text (no special tokens added): a numpy float32 array
        ``[T, V]`` per text of T tokens, row i being log p(. | tokens 0..i). Used for KL parity checks."""
        import torch

        name = self.resolve_adapter(adapter)
        out = []
        for text in texts:
            ids = self.tokenize(text)
            if not ids:
                out.append(torch.zeros((0, self.model.config.vocab_size)).numpy())
                continue
            with torch.inference_mode():
                logits = self._forward(name, input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
            out.append(torch.log_softmax(logits, dim=-1).cpu().numpy())
        return out

    def close(self) -> None:
        self.model = None
        self._peft = None
        self._adapter_paths = {}
        self._peft_names = {}

    # --- internals -------------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> Row:
        import torch

        refuse_json_schema(self.name, request)
        ids = self.tokenize(self.render(request))
        if not ids:
            raise BadInputError("the prompt is empty after tokenization")
        if self.context_length and len(ids) >= self.context_length:
            raise prompt_too_long(len(ids), self.context_length)
        gen = None
        if request.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(request.seed if request.seed is not None else int(torch.seed() % (2**63)))
        return Row(request=request, prompt_ids=ids, rng=gen)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _is_eos(self, token_id: int) -> bool:
        return token_id in self.eos_ids

    def _pick(self, row: Row, logits) -> tuple[int, float]:
        import torch

        logp = torch.log_softmax(logits, dim=-1)
        req = row.request
        if req.top_logprobs:
            best = torch.topk(logp, min(req.top_logprobs, logp.numel()))
            row.top.append([(int(t), float(v)) for v, t in zip(best.values, best.indices, strict=True)])
        counts = penalty_counts(req, row.ids)
        if counts:
            toks = torch.tensor(list(counts), dtype=torch.long)
            occ = torch.tensor(list(counts.values()), dtype=logits.dtype)
            logits = logits.clone()
            logits[toks] -= req.presence_penalty + req.frequency_penalty * occ
        if req.json_mode:
            allowed = torch.tensor(self._allowed(row, logits.numpy()), dtype=torch.long)
            logits = torch.full_like(logits, float("-inf")).index_copy(0, allowed, logits[allowed])
        if req.temperature == 0:
            tok = int(torch.argmax(logits))
            return tok, float(logp[tok])
        scores = logits / req.temperature
        if req.top_k and req.top_k > 0:
            kth = torch.topk(scores, min(req.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if req.top_p < 1.0:
            sorted_scores, idx = torch.sort(scores, descending=True)
            cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_scores, dim=-1) >= req.top_p  # keep the token that crosses top_p
            scores = scores.scatter(0, idx, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        tok = int(torch.multinomial(probs, 1, generator=row.rng))
        return tok, float(logp[tok])

    def _advance(self, row: Row, tok: int, lp: float, now: float) -> None:
        row.t_first = row.t_first or now
        row.t_last = now
        if tok in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.ids.append(tok)
        row.logprobs.append(lp)
        row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
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
        `resolve_adapter`), yielding after every decode step: the static batching path."""
        return self._steps(rows, adapter)

    def open_batch(self, adapter: str | None = None) -> TorchBatch | None:
        """A running batch that rows can join between decode steps (continuous batching), or None when the
        model's KV cache cannot be merged (only plain dynamic caches: no sliding window, no recurrent state)."""
        cfg = self.model.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) or getattr(
                cfg, "layer_types", None) and any(t != "full_attention" for t in cfg.layer_types):
            return None
        return TorchBatch(self, adapter)

    def _steps(self, rows: list[Row], adapter: str | None = None) -> Iterator[None]:
        """Run the batch to completion with `adapter` (None: base model), yielding after every decode step.
        The adapter is (re)activated before every forward, so interleaved streams stay correct."""
        import torch

        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            att[i, width - len(r.prompt_ids):] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        past = None
        step_ids, step_pos = ids, pos
        # Without padding the mask is all ones: leave it out so the model takes its causal fast path
        # (no per-step mask building), which is a large share of a small model's step on CPU.
        padded = bool((att == 0).any())
        # inference mode is entered per step, never held across the `yield`: it is thread-local state, and a
        # suspended stream would otherwise leave the caller's code (e.g. training) in inference mode
        while True:
            with torch.inference_mode():
                out = self._forward(
                    adapter, input_ids=step_ids.to(self.device),
                    attention_mask=att.to(self.device) if padded else None,
                    position_ids=step_pos.to(self.device), cache=past, use_cache=True, logits_to_keep=1,
                )
                past = out.cache
                logits = out.logits[:, -1, :].float().cpu()
                now = time.perf_counter()
                next_tokens = []
                for i, r in enumerate(rows):
                    if r.finish_reason:
                        next_tokens.append(self.pad_id)
                        continue
                    tok, lp = self._pick(r, logits[i])
                    self._advance(r, tok, lp, now)
                    next_tokens.append(tok)
            yield
            if all(r.finish_reason for r in rows):
                return
            step_ids = torch.tensor(next_tokens, dtype=torch.long)[:, None]
            step_pos = step_pos[:, -1:] + 1
            att = torch.cat([att, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)


class TorchBatch:
    """Continuous batching over the torch engine: rows `admit` between decode steps and leave when finished.

    Each admission prefills the new rows as their own left-padded batch, then merges their KV cache into
    the running batch (left-padding the shorter one along the sequence axis; padded positions are masked),
    so a new request never waits for the running ones to finish. Finished rows are dropped from the cache
    with `drop`, and leading columns that are padding for every row are cut off. One adapter per batch
    (the scheduler keeps one batch per adapter in flight)."""

    def __init__(self, engine: TorchEngine, adapter: str | None):
        self.engine = engine
        self.adapter = adapter
        self.rows: list[Row] = []
        self._past = None
        self._att = None  # [B, T] attention mask over the cache
        self._pos = None  # [B, 1] position of each row's next input token
        self._next = None  # [B, 1] each row's next input token
        self._padded = False  # whether any row has padding in the cache (the mask must be passed)

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, ids, att, pos, past, padded: bool | None = None):
        import torch

        if padded is None:
            padded = bool((att == 0).any())
        dev = self.engine.device
        with torch.inference_mode():
            out = self.engine._forward(self.adapter, input_ids=ids.to(dev),
                                       attention_mask=att.to(dev) if padded else None,
                                       position_ids=pos.to(dev), cache=past, use_cache=True, logits_to_keep=1)
            return out.cache, out.logits[:, -1, :].float().cpu()

    def _pick_all(self, rows: list[Row], logits) -> list[int]:
        import torch

        now = time.perf_counter()
        chosen = []
        with torch.inference_mode():
            for i, r in enumerate(rows):
                if r.finish_reason:
                    chosen.append(self.engine.pad_id)
                    continue
                tok, lp = self.engine._pick(r, logits[i])
                self.engine._advance(r, tok, lp, now)
                chosen.append(tok)
        return chosen

    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` (from `engine.prepare`) and add them; each gets its first token."""
        import torch

        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.engine.pad_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            att[i, width - len(r.prompt_ids):] = 1
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        past, logits = self._forward(ids, att, pos, None)
        nxt = torch.tensor(self._pick_all(rows, logits), dtype=torch.long)[:, None]
        pos = pos[:, -1:] + 1
        if not _mergeable(past):
            raise BadInputError(f"continuous batching needs a plain dynamic KV cache, this model has "
                                f"{type(past).__name__}", "serve it with static batching (open_batch returns None)")
        if not self.rows:
            self._past, self._att, self._pos, self._next = past, att, pos, nxt
        else:
            self._past, self._att = _merge_caches(self._past, self._att, past, att)
            self._pos = torch.cat([self._pos, pos])
            self._next = torch.cat([self._next, nxt])
        self._padded = bool((self._att == 0).any())  # (kept, not recomputed every step)
        self.rows.extend(rows)

    def step(self) -> None:
        """One decode step for every row in the batch."""
        import torch

        if not self.rows:
            return
        att = torch.cat([self._att, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
        self._past, logits = self._forward(self._next, att, self._pos, self._past, self._padded)
        self._att = att
        self._pos = self._pos + 1
        self._next = torch.tensor(self._pick_all(self.rows, logits), dtype=torch.long)[:, None]

    def drop(self, rows: list[Row]) -> None:
        """Remove `rows` (finished or cancelled) from the batch and its cache."""
        import torch

        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._past = self._att = self._pos = self._next = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self._past.batch_select_indices(idx)
        self._att, self._pos, self._next = self._att[idx], self._pos[idx], self._next[idx]
        lead = int((self._att.cumsum(-1) == 0).sum(-1).min())  # columns that are padding for every row
        if lead:
            self._att = self._att[:, lead:]
            for layer in self._past.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
        self._padded = bool((self._att == 0).any())


def _merge_caches(past_a, att_a, past_b, att_b):
    """Stack two dynamic KV caches (and their masks) along the batch axis, left-padding the shorter one."""
    import torch
    import torch.nn.functional as F

    ta, tb = att_a.shape[1], att_b.shape[1]
    width = max(ta, tb)
    for la, lb in zip(past_a.layers, past_b.layers, strict=True):
        ka, va, kb, vb = la.keys, la.values, lb.keys, lb.values
        if ta < width:
            ka, va = F.pad(ka, (0, 0, width - ta, 0)), F.pad(va, (0, 0, width - ta, 0))
        if tb < width:
            kb, vb = F.pad(kb, (0, 0, width - tb, 0)), F.pad(vb, (0, 0, width - tb, 0))
        la.keys, la.values = torch.cat([ka, kb]), torch.cat([va, vb])
    att = torch.cat([F.pad(att_a, (width - ta, 0)), F.pad(att_b, (width - tb, 0))])
    return past_a, att


def _mergeable(cache) -> bool:
    """Only plain dynamic caches (full attention, no sliding window or recurrent state) can be merged."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


__all__ = ["TorchBatch", "TorchEngine"]

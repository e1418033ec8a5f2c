"""The PyTorch engine: a Hugging Face causal LM run by our own batched decode loop.

Batched greedy and sampled generation with left padding and a KV cache, per-request seeds (reproducible
whatever else is in the batch), stop strings, token streaming and per-token logprobs. The loop is ours
(not `model.generate`) so that streaming, stop strings and per-request sampling share one code path; a
test checks it matches `transformers.generate` token for token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.engines.base import (
    EngineInfo,
    GenerationRequest,
    GenerationResult,
    Logprobs,
    TokenEvent,
    find_stop,
    stop_holdback,
)
from slmops.errors import BadInputError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


@dataclass
class _Row:
    request: GenerationRequest
    prompt_ids: list[int]
    generator: Any = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    t_first: float | None = None
    t_last: float | None = None


class TorchEngine:
    name = "torch"

    def __init__(self, path: str | Path | None = None, *, model=None, tokenizer=None, dtype: str = "float32",
                 device: str = "cpu", max_batch_size: int = 16, threads: int | None = None):
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

    # --- protocol --------------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        from slmops.models.presets import count_parameters

        size = None
        if self.path and Path(self.path).is_dir():
            size = sum(p.stat().st_size for p in Path(self.path).glob("*")
                       if p.suffix in (".safetensors", ".bin", ".pt"))
        return EngineInfo(
            name=self.name, format="hf", precision={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype],
            parameters=count_parameters(self.model), bytes_on_disk=size, device=self.device, path=self.path,
            context_length=self.context_length, vocab_size=self.model.config.vocab_size,
            chat_template=getattr(self.tokenizer, "chat_template", None),
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
        """Generate for every request, in batches of `max_batch_size` (grouped by prompt length)."""
        rows = [self._row(r) for r in requests]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
        results: list[GenerationResult | None] = [None] * len(rows)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            t0 = time.perf_counter()
            for _ in self._steps([rows[i] for i in chunk]):
                pass
            for i in chunk:
                results[i] = self._result(rows[i], t0)
        return results  # type: ignore[return-value]

    def stream(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        row = self._row(request)
        for _ in self._steps([row]):
            safe = len(row.text) if row.finish_reason else len(row.text) - stop_holdback(row.text, request.stop)
            if row.text.endswith("\ufffd") and not row.finish_reason:
                safe = min(safe, len(row.text) - 1)
            delta = row.text[row.emitted:safe] if safe > row.emitted else ""
            row.emitted = max(row.emitted, safe)
            yield TokenEvent(
                token_id=row.ids[-1] if row.ids else None, text=delta,
                logprob=row.logprobs[-1] if row.logprobs else None, finish_reason=row.finish_reason,
                prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.ids),
            )
            if row.finish_reason:
                return

    def logprobs(self, texts: list[str], batch_size: int = 8) -> list[Logprobs]:
        """log p(token_i | tokens<i) for each text (no special tokens added)."""
        import torch

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
                logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
            for i, e in enumerate(enc):
                vals: list[float | None] = [None] + [float(x) for x in lp[i, : max(0, len(e) - 1)]]
                out.append(Logprobs(token_ids=e, tokens=self.tokenizer.convert_ids_to_tokens(e),
                                    logprobs=vals[: len(e)]))
        return out

    def close(self) -> None:
        self.model = None

    # --- internals -------------------------------------------------------------------------------
    def _row(self, request: GenerationRequest) -> _Row:
        import torch

        ids = self.tokenize(self.render(request))
        if not ids:
            raise BadInputError("the prompt is empty after tokenization")
        if self.context_length and len(ids) >= self.context_length:
            raise BadInputError(
                f"prompt is {len(ids)} tokens, the model's context is {self.context_length}",
                "shorten the prompt",
            )
        gen = None
        if request.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(request.seed if request.seed is not None else int(torch.seed() % (2**63)))
        return _Row(request=request, prompt_ids=ids, generator=gen)

    def _result(self, row: _Row, t0: float) -> GenerationResult:
        return GenerationResult(
            text=row.text, token_ids=list(row.ids), finish_reason=row.finish_reason or "length",
            prompt_tokens=len(row.prompt_ids), completion_tokens=len(row.ids),
            ttft_s=(row.t_first or t0) - t0, latency_s=(row.t_last or t0) - t0,
        )

    def _pick(self, row: _Row, logits) -> tuple[int, float]:
        import torch

        logp = torch.log_softmax(logits, dim=-1)
        req = row.request
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
        tok = int(torch.multinomial(probs, 1, generator=row.generator))
        return tok, float(logp[tok])

    def _advance(self, row: _Row, tok: int, lp: float, now: float) -> None:
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
        elif len(row.ids) >= row.request.max_new_tokens:
            row.finish_reason = "length"

    def _steps(self, rows: list[_Row]) -> Iterator[None]:
        """Run the batch to completion, yielding after every decode step."""
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
        with torch.inference_mode():
            while True:
                out = self.model(
                    input_ids=step_ids.to(self.device), attention_mask=att.to(self.device) if padded else None,
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

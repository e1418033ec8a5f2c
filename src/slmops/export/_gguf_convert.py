"""Runs llama.cpp's converter scripts in a subprocess, with slmops' pre-tokenizer handling.

    python -m slmops.export._gguf_convert --llama-cpp-dir DIR check --model HF_DIR [--pre-tokenizer-fallback gpt-2]
    python -m slmops.export._gguf_convert --llama-cpp-dir DIR convert --model HF_DIR --outfile F --outtype f16 [...]
    python -m slmops.export._gguf_convert --llama-cpp-dir DIR convert-lora --adapter A --base HF_DIR --outfile F

``check`` does what conversion does before touching weights - reads config.json, finds the converter's class
for the architecture, and builds the vocabulary (where the BPE pre-tokenizer is detected) - and reports
the result; ``convert``/``convert-lora`` run the scripts' own ``main()``. The last stdout line is a JSON
object: ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "hint": ..., "bad_input": bool}``; exit code
2 means the input was refused.

The pre-tokenizer: the converter identifies a BPE tokenizer's pre-tokenizer by hashing the tokens of a probe
string and raises for unknown hashes. With ``--pre-tokenizer-fallback NAME`` an unknown hash maps to NAME
(slmops passes ``gpt-2`` for byte-level BPE tokenizers with GPT-2 splitting, such as the ones it trains);
``--pre-tokenizer NAME`` forces NAME even for known hashes. Known tokenizers (Qwen, Llama 3, ...) are
detected as usual. Everything else about the conversion is llama.cpp's.

This module imports llama.cpp's ``conversion`` package and its ``gguf-py``; it is only ever run as a
subprocess of slmops.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

STATE: dict = {"pre_tokenizer": None, "pre_tokenizer_detected": None}


class UnknownPreTokenizer(Exception):
    pass


def _emit(obj: dict, code: int = 0) -> None:
    sys.stdout.write("\n" + json.dumps(obj) + "\n")
    sys.stdout.flush()
    raise SystemExit(code)


def _setup(llama_dir: Path, fallback: str | None, force: str | None):
    sys.path.insert(0, str(llama_dir))
    sys.path.insert(1, str(llama_dir / "gguf-py"))
    import conversion  # noqa: F401 - llama.cpp's converter package
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        if force:
            STATE.update(pre_tokenizer=force, pre_tokenizer_detected=False)
            return force
        try:
            res = original(self, tokenizer)
        except NotImplementedError as e:
            if not fallback:
                raise UnknownPreTokenizer(str(e)) from e
            STATE.update(pre_tokenizer=fallback, pre_tokenizer_detected=False)
            return fallback
        STATE.update(pre_tokenizer=res, pre_tokenizer_detected=True)
        return res

    TextModel.get_vocab_base_pre = get_vocab_base_pre

    from gguf.gguf_writer import GGUFWriter

    original_add_chat_template = GGUFWriter.add_chat_template

    def add_chat_template(self, value):
        if isinstance(value, str):
            value = plain_jinja(value)
        elif value is not None:
            value = [{**c, "template": plain_jinja(c["template"])} if isinstance(c.get("template"), str) else c
                     for c in value]
        return original_add_chat_template(self, value)

    GGUFWriter.add_chat_template = add_chat_template
    return conversion


_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def plain_jinja(template: str) -> str:
    """`template` without transformers' ``{% generation %}`` extension, which llama.cpp's and Ollama's Jinja
    engines do not know: each tag becomes an always-true ``if`` block (whitespace control kept), so it
    renders the same text everywhere."""
    def repl(m: re.Match) -> str:
        return f"{{%{m.group(1)} {'endif' if m.group(2) else 'if true'} {m.group(3)}%}}"

    return _GENERATION_TAG.sub(repl, template)


def _run_script(llama_dir: Path, name: str, argv: list[str]) -> None:
    """Run one of llama.cpp's scripts as ``__main__`` with `argv` (in this process, after the patches)."""
    import runpy

    sys.argv = [name, *argv]
    runpy.run_path(str(llama_dir / name), run_name="__main__")


def _check(conversion, model_dir: Path) -> dict:
    import gguf
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    hparams = ModelBase.load_hparams(model_dir, False)
    try:
        arch = get_model_architecture(hparams, ModelType.TEXT)
    except ValueError as e:
        _emit({"ok": False, "bad_input": True, "error": f"{model_dir}/config.json names no architecture: {e}"}, 2)
    try:
        cls = get_model_class(arch)
    except NotImplementedError:
        _emit({"ok": False, "bad_input": True, "architecture": arch,
               "error": f"llama.cpp's converter does not support the architecture {arch!r}",
               "hint": "GGUF export works for architectures llama.cpp knows (Llama, Qwen2, Phi-3, Gemma, Mistral, ...); "
                       "export this model to ONNX instead (`slmops export onnx`)"}, 2)
    with tempfile.TemporaryDirectory() as tmp:
        model = cls(model_dir, gguf.LlamaFileType.MOSTLY_F16, Path(tmp) / "probe.gguf", dry_run=True)
        model.set_vocab()
        kv = {}
        for sect in model.gguf_writer.kv_data:
            for key, val in sect.items():
                kv[key] = val.value
    tok_model = kv.get("tokenizer.ggml.model")
    return {"ok": True, "architecture": arch, "gguf_architecture": model.gguf_writer.arch,
            "tokenizer_model": tok_model, "pre_tokenizer": STATE["pre_tokenizer"] or kv.get("tokenizer.ggml.pre"),
            "pre_tokenizer_detected": STATE["pre_tokenizer_detected"],
            "chat_template": isinstance(kv.get("tokenizer.chat_template"), str)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slmops.export._gguf_convert")
    parser.add_argument("--llama-cpp-dir", required=True, type=Path)
    parser.add_argument("--pre-tokenizer-fallback", default=None)
    parser.add_argument("--pre-tokenizer", default=None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--model", required=True, type=Path)
    v = sub.add_parser("convert")
    v.add_argument("--model", required=True, type=Path)
    v.add_argument("--outfile", required=True, type=Path)
    v.add_argument("--outtype", default="f16")
    v.add_argument("--model-name", default=None)
    lo = sub.add_parser("convert-lora")
    lo.add_argument("--adapter", required=True, type=Path)
    lo.add_argument("--base", required=True, type=Path)
    lo.add_argument("--outfile", required=True, type=Path)
    lo.add_argument("--outtype", default="f16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        conversion = _setup(args.llama_cpp_dir, args.pre_tokenizer_fallback, args.pre_tokenizer)
        if args.cmd == "check":
            _emit(_check(conversion, args.model))
        if args.cmd == "convert":
            argv = [str(args.model), "--outfile", str(args.outfile), "--outtype", args.outtype]
            if args.model_name:
                argv += ["--model-name", args.model_name]
            _run_script(args.llama_cpp_dir, "convert_hf_to_gguf.py", argv)
        else:
            _run_script(args.llama_cpp_dir, "convert_lora_to_gguf.py",
                        [str(args.adapter), "--base", str(args.base), "--outfile", str(args.outfile),
                         "--outtype", args.outtype])
    except UnknownPreTokenizer:
        _emit({"ok": False, "bad_input": True,
               "error": "llama.cpp's converter does not recognise this tokenizer's BPE pre-tokenizer (its probe hash "
                        "is unknown) and it is not a byte-level BPE with GPT-2 splitting that slmops can map",
               "hint": "pass pre_tokenizer=NAME (--pre-tokenizer NAME) with the llama.cpp pre-tokenizer that splits text "
                       "as this tokenizer does (e.g. gpt-2, llama-bpe, qwen2), and check the tokenization parity "
                       "slmops reports"}, 2)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - reported as JSON to the parent
        logging.getLogger("slmops").exception("conversion failed")
        _emit({"ok": False, "error": f"llama.cpp's converter failed: {type(e).__name__}: {e}"}, 1)
    _emit({"ok": True, "pre_tokenizer": STATE["pre_tokenizer"], "pre_tokenizer_detected": STATE["pre_tokenizer_detected"]})


if __name__ == "__main__":
    main()

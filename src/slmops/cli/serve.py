"""`slmops serve`: an OpenAI-compatible server over slmops models (the app is `slmops.serve.app`)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app
from slmops.errors import BadInputError


def parse_model_args(models: list[str], adapters: list[str], workspace=None) -> list:
    """`M[=NAME]` arguments and `[MODEL:]NAME=DIR` adapters as ModelSpecs (names checked, adapters placed)."""
    from slmops.serve.manager import ModelSpec, check_name

    specs = []
    for arg in models:
        ref, sep, name = arg.rpartition("=") if "=" in arg else (arg, "", "")
        if not sep:
            ref = arg
            name = default_name(arg, workspace)
        if not ref:
            raise BadInputError(f"model argument {arg!r} has no model before '='", "use MODEL or MODEL=NAME")
        if any(s.name == name for s in specs):
            raise BadInputError(f"two models are named {name!r}", "give each its own name: MODEL=NAME")
        specs.append(ModelSpec(ref=ref, name=check_name(name)))
    by_name = {s.name: s for s in specs}
    for arg in adapters:
        target, sep, path = arg.partition("=")
        if not sep or not path:
            raise BadInputError(f"--adapter {arg!r} is not NAME=DIR", "e.g. --adapter gifts=runs/lora-gifts")
        model_name, colon, adapter_name = target.rpartition(":")
        if not colon:
            if len(specs) != 1:
                raise BadInputError(f"--adapter {arg!r}: say which model it goes on (MODEL:NAME=DIR)",
                                    "served: " + ", ".join(by_name))
            model_name, adapter_name = specs[0].name, target
        if model_name not in by_name:
            raise BadInputError(f"--adapter {arg!r}: no served model named {model_name!r}",
                                "served: " + ", ".join(by_name))
        check_name(adapter_name, "adapter")
        if adapter_name == "base":
            raise BadInputError("'base' is reserved for the base model without adapters", "choose another name")
        by_name[model_name].adapters[adapter_name] = path
    return specs


def default_name(ref: str, workspace=None) -> str:
    """A served name for a model reference: the artifact's name, else the folder or file stem."""
    name = None
    if workspace is not None and workspace.registry.lookup(ref) is not None:
        name = workspace.manifest(ref).name
    if not name:
        p = Path(ref.split("#")[0].rstrip("/"))
        name = p.stem if p.suffix == ".gguf" else p.name
        if name == "model" and p.parent.name:  # a GGUF export folder's model.gguf
            name = p.parent.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:64]
    return name or "model"


@app.command("serve")
def serve(
    models: Annotated[list[str], typer.Argument(help="Models to serve, as MODEL or MODEL=NAME. MODEL is a workspace artifact id or alias, a Hugging Face model folder, an ONNX GenAI export folder, a .gguf file or GGUF export folder; NAME is what clients put in `model` (default: the artifact or folder name).")],
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="NAME=DIR: a LoRA adapter loaded over the model (MODEL:NAME=DIR when serving several). Clients select it with model \"MODEL:NAME\" or \"NAME\". Repeatable.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network, with --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (default: 8000).")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SLMOPS_API_KEY", help="Require 'Authorization: Bearer KEY' on the API (default: $SLMOPS_API_KEY; none: open). /health, /ready and /metrics stay open.")] = None,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most requests decoded together per model (default: 16; llama.cpp always 1).")] = 16,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests that may wait for a batch slot; more are answered 429 with Retry-After (default: 64).")] = 64,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds, queueing included; 0 for none (default: 600).")] = 600.0,
    keep_alive: Annotated[float, typer.Option(help="Unload a model after this many idle seconds; it loads again on its next request. 0 keeps models loaded (default: 0).")] = 0.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens generated when a request sets no max_tokens (default: 512, within the context).")] = 512,
    max_body: Annotated[int, typer.Option(min=1024, help="Largest request body in bytes; larger ones get 413 (default: 1048576).")] = 1 << 20,
    threads: Annotated[int | None, typer.Option(help="CPU threads per engine (default: for an engine in a worker process, all cores but one, which is left to the HTTP server; otherwise the runtime's choice).")] = None,
    capture: Annotated[Path | None, typer.Option(help="Append every request and answer to this JSONL file as chat data (off by default; see --capture-redact).")] = None,
    capture_redact: Annotated[str | None, typer.Option(help="Redaction hook for --capture: 'pii' (mask e-mails and numbers) or module:function (default: none).")] = None,
    lazy: Annotated[bool, typer.Option("--lazy", help="Load models on their first request instead of at start-up.")] = False,
    grace: Annotated[float, typer.Option(help="On shutdown (Ctrl-C, SIGTERM), seconds to let in-flight requests finish (default: 30).")] = 30.0,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Print one JSON line per request on stderr (default: on).")] = True,
    stream_interval: Annotated[float, typer.Option(min=0, help="Milliseconds an engine worker process may hold streamed tokens to send them together (a request's first and last tokens go at once); 0 sends every decode step (default: 10: a fast model streams in bursts of a few tokens instead of paying a process hop per token).")] = 10.0,
    isolation: Annotated[str, typer.Option(help="Where each engine runs: 'process' (its own worker process: decoding does not compete with the HTTP server for Python's GIL, and an engine crash fails only its requests), 'thread' (inside the server process) or 'auto' (default: a worker process for Hugging Face models on the torch engine, a thread for ONNX and GGUF, whose runtimes decode in native code).")] = "auto",
    engine: Annotated[str, typer.Option(help="'auto' serves with slmops's engines; 'vllm' hands a Hugging Face model and its LoRA adapters to vLLM's OpenAI server (needs vllm and a CUDA GPU).")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the arguments and print what would be served (the vLLM command line with --engine vllm), then exit.")] = False,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (chat, completions, streaming, adapters, metrics).

    Any OpenAI client works: set its base URL to http://HOST:PORT/v1. Routes: GET /v1/models, POST /v1/chat/completions and /v1/completions (stream: true for server-sent events), POST /v1/models/load and /v1/models/unload, GET /health, /ready, /metrics (Prometheus) and /openapi.json. Requests are batched per model (continuous batching on the torch engine); a full queue answers 429.

    Examples:\n
      slmops serve runs/student=support\n
      slmops serve base-model=qwen --adapter gifts=runs/lora-gifts --api-key $KEY\n
      slmops serve exports/int4=support-int4 exports/q4.gguf=support-gguf --max-queue 32\n
      curl http://127.0.0.1:8000/v1/chat/completions -d '{"model":"support","messages":[{"role":"user","content":"hi"}]}'
    """
    if engine not in ("auto", "vllm"):
        raise BadInputError(f"--engine {engine!r} is not known", "use auto or vllm")
    if not models:
        raise BadInputError("no model to serve", "slmops serve MODEL[=NAME] ...")
    ws = common.get_workspace()
    if engine == "vllm":
        _serve_vllm(models, adapter or [], host, port, api_key, dry_run)
        return
    specs = parse_model_args(models, adapter or [], ws)
    from slmops.serve.manager import ISOLATION

    if isolation not in ISOLATION:
        raise BadInputError(f"--isolation {isolation!r} is not known", "use auto, process or thread")
    for s in specs:
        s.isolation = isolation
        if threads:
            s.engine_options["threads"] = threads
    if dry_run:
        for s in specs:
            extra = "".join(f"\n    adapter {a} = {p}" for a, p in s.adapters.items())
            typer.echo(f"{s.name}: {s.ref}{extra}")
        typer.echo(f"listen on http://{host}:{port}/v1 (auth: {'api key' if api_key else 'none'})")
        return
    import logging
    import sys

    import uvicorn

    from slmops.serve.app import ServerConfig, create_app
    from slmops.serve.capture import load_redactor
    from slmops.serve.manager import ModelManager

    # an engine on a thread of this process (--isolation thread, ONNX, GGUF) shares the GIL with the event
    # loop: hand it over more often than every 5 ms, so a token's server-side work does not wait a whole slice
    sys.setswitchinterval(float(os.environ.get("SLMOPS_SWITCH_INTERVAL", "0.0005")))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        common.info(f"warning: listening on {host} without --api-key: anyone who can reach it can use it")
    manager = ModelManager(specs, workspace=ws, keep_alive_s=keep_alive, max_batch_size=max_batch_size,
                           max_queue=max_queue, stream_interval_s=stream_interval / 1000)
    config = ServerConfig(api_key=api_key, request_timeout_s=timeout or None, max_body_bytes=max_body,
                          default_max_tokens=max_tokens, capture=capture,
                          redact=load_redactor(capture_redact), shutdown_grace_s=grace, preload=not lazy)
    access = logging.getLogger("slmops.serve.access")
    access.propagate = False
    if access_log:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    server_log = logging.getLogger("slmops.serve")
    if not common.STATE.quiet:
        server_log.setLevel(logging.INFO)
    common.info(f"serving {', '.join(s.name for s in specs)} on http://{host}:{port}/v1"
                + (" (loading...)" if not lazy else ""))
    uvicorn.run(create_app(manager, config), host=host, port=port, access_log=False,
                log_level="warning" if common.STATE.quiet else "info", timeout_graceful_shutdown=int(grace) or None)


def _serve_vllm(models: list[str], adapters: list[str], host: str, port: int, api_key: str | None,
                dry_run: bool) -> None:
    import subprocess

    from slmops.serve.vllm import format_command, vllm_available, vllm_command

    specs = parse_model_args(models, adapters, common.get_workspace())
    ws = common.get_workspace()
    pairs = []
    for s in specs:
        try:
            path = str(ws.resolve(s.ref))
        except Exception:  # noqa: BLE001 - not an artifact: a path or hub id
            path = s.ref
        pairs.append((path, s.name))
    adapter_map = {a: p for s in specs for a, p in s.adapters.items()}
    launch = vllm_command(pairs, adapter_map, host=host, port=port, api_key=api_key)
    if dry_run:
        typer.echo(format_command(launch))
        return
    reason = vllm_available()
    if reason:
        raise BadInputError(reason, "use --dry-run to see the command, or serve without --engine vllm")
    common.info(f"starting vLLM: {format_command(launch)}")
    raise typer.Exit(subprocess.call(launch.argv, env={**os.environ, **launch.env}))

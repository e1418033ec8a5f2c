"""`slmops chat`: talk to a model in the terminal (the logic is `slmops.serve.chat.ChatSession`)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app


@app.command("chat")
def chat(
    model: Annotated[str, typer.Argument(help="The model: a workspace artifact id or alias, a model or adapter folder, a .gguf file, or an http(s) OpenAI-compatible server URL (URL#model picks the model).")],
    system: Annotated[str | None, typer.Option("--system", help="System prompt for the whole conversation (change it with /system TEXT).")] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy, same reply every time (/temp X changes it).")] = 0.7,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per reply (/max N changes it).")] = 256,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: the same conversation gets the same replies (default: none).")] = None,
    adapter: Annotated[str | None, typer.Option(help="Generate with this loaded adapter (e.g. a LoRA name on a server or GGUF export; `base` for the base model without adapters).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for server URLs (default: $SLMOPS_API_KEY or $OPENAI_API_KEY).")] = None,
) -> None:
    """Chat with a model in the terminal: replies stream as they are generated, the conversation is kept.

    Every message is sent with the whole conversation so far, through the model's chat template (a server URL applies its own), so you see what the model does in a multi-turn setting. Type /help for the commands: /reset, /system TEXT, /temp X, /max N, /seed N, /history, /prompt (the exact prompt text), /exit. Ctrl-C stops a reply being written; Ctrl-D (or Ctrl-C at the prompt) leaves. Lines can be piped in: one message per line.

    Examples:\n
      slmops chat production\n
      slmops chat runs/s1 --system "Answer with one JSON object." --temperature 0\n
      slmops chat runs/ft --adapter base     # base model, adapter off\n
      slmops chat http://127.0.0.1:8000/v1#support --api-key $KEY\n
      printf 'hi\\nand again\\n' | slmops chat model.gguf --seed 0
    """
    from slmops.engines import open_engine
    from slmops.errors import BadInputError, SlmopsError
    from slmops.serve.chat import ChatSession

    remote = model.startswith(("http://", "https://"))
    if api_key and not remote:
        common.info("note: --api-key is only used for server URLs; ignored")
    common.info(f"loading {model} ...")
    engine = open_engine(model, workspace=common.get_workspace(), **({"api_key": api_key} if remote and api_key else {}))
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and line editing in input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
    failed = 0
    try:
        session = ChatSession(engine, system=system, temperature=temperature, max_new_tokens=max_tokens,
                              seed=seed, adapter=adapter)
        common.info(f"chatting with {model} ({engine.name}); /help for commands, Ctrl-D to leave")
        while not session.done:
            try:
                line = input("you> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                if interactive:
                    typer.echo()
                break
            if not line.strip():
                continue
            shown = session.handle(line)
            if shown is not None:
                if shown:
                    typer.echo(shown)
                continue
            pieces = session.send(line)
            try:
                for piece in pieces:
                    typer.echo(piece, nl=False)  # click.echo flushes: tokens appear as they come
            except KeyboardInterrupt:
                pieces.close()
                typer.echo()
                common.info("(stopped; the part shown is kept in the conversation)")
                continue
            except SlmopsError as e:
                if isinstance(e, BadInputError):
                    raise  # e.g. no chat template: every message would fail the same way
                typer.echo()
                common.error(f"{e}\n  (the message was not added to the conversation; send it again to retry)")
                failed += 1
                continue
            typer.echo()
            last = session.last
            if last is not None and last.finish_reason == "length":
                common.info(f"(cut at {session.max_new_tokens} tokens: /max N allows longer replies)")
    finally:
        engine.close()
    if failed:
        raise typer.Exit(1)

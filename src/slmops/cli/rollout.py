"""`slmops bundle`, `slmops rollout publish|status|advance|halt|rollback|collect`, `slmops agent`.

    Bundles per device profile, a static channel index (plain files), and the device agent. See docs/rollout.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from slmops.cli import common
from slmops.cli.app import app

rollout_app = typer.Typer(
    help=(
        "Staged rollout through a static channel index (plain files any web server, object store or CDN can "
        "host).\n\nThe usual flow: `slmops bundle` -> `rollout publish --percent 10` -> watch `rollout status` "
        "-> `rollout advance --percent 50` -> ... 100; `rollout halt` / `rollout rollback` when it goes wrong. "
        "Devices run `slmops agent`."
    ),
    no_args_is_help=True,
)
app.add_typer(rollout_app, name="rollout")

IndexOpt = Annotated[Path, typer.Option("--index", help="The channel index folder (what you upload to the web server).")]
ChannelOpt = Annotated[str, typer.Option("--channel", help="Channel name (default: stable).")]


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _channel_line(ch) -> str:
    cur = ch.current.version if ch.current else "none"
    prev = ch.previous.version if ch.previous else "none"
    return (f"channel {ch.channel}: {cur} at {ch.percent:g}% ({ch.state}); previous {prev}"
            + (f"; withdrawn {', '.join(ch.withdrawn)}" if ch.withdrawn else ""))


@app.command("bundle")
def bundle(
    blueprint: Annotated[Path, typer.Option("--blueprint", "-b", help="Blueprint YAML: device profiles -> variant and smoke test (see examples/blueprint.yaml).")],
    version: Annotated[str, typer.Option("--version", help="Version of these bundles, e.g. v2 (letters, digits, . _ + -).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to build into; bundles land in OUT/VERSION/PROFILE/.")],
    profile: Annotated[list[str] | None, typer.Option("--profile", "-p", help="Build only this profile (repeatable; default: all).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace bundles that already exist.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Build one versioned bundle per device profile of a blueprint.

    Each bundle holds the variant's files (model/), serve.json (name, engine, options, max context), the Foundry Local inference_model.json (ONNX) or Ollama Modelfile (GGUF) where it applies, the smoke test (smoke/), and bundle.json with the sha256 and size of every file.

    Examples:\n
      slmops bundle --blueprint examples/blueprint.yaml --version v2 --out bundles\n
      slmops -w ws bundle -b fleet.yaml --version 2026.11.29 --out bundles --profile cpu-arm-4gb
    """
    from slmops.rollout.bundle import build_bundles

    ws = common.get_workspace() if common.STATE.workspace.exists() else None
    results = build_bundles(blueprint, version, out, workspace=ws, profiles=profile or None, force=force)
    if as_json:
        _print_json([r.to_dict() for r in results])
        return
    for r in results:
        common.console.print(f"{r.profile}: {r.path} ({r.files} files, {r.size_bytes / 1e6:.1f} MB, "
                             f"bundle.json sha256 {r.bundle_sha256[:12]}...)", highlight=False)
        for note in r.notes:
            common.info(f"  {r.profile}: {note}")
    common.info(f"publish with: slmops rollout publish {Path(out) / version} --index INDEX --channel stable --percent 10")


@rollout_app.command("publish")
def publish(
    bundle_dir: Annotated[Path, typer.Argument(help="OUT/VERSION from `slmops bundle` (or a single profile's bundle).")],
    index: IndexOpt,
    channel: ChannelOpt = "stable",
    percent: Annotated[float, typer.Option(help="Share of devices that take this version now, 0-100 (default: 10).")] = 10.0,
) -> None:
    """Copy a version's bundles into the index and make it the channel's current version at --percent.

    Bundles are verified and copied to INDEX/bundles/VERSION/PROFILE/ (immutable once published); the channel file INDEX/channels/CHANNEL.json is replaced atomically. The version that was fully rolled out becomes `previous`: devices outside the percentage stay on it.

    Example:\n
      slmops rollout publish bundles/v2 --index site --channel stable --percent 10
    """
    from slmops.rollout.channel import publish as do_publish

    ch = do_publish(bundle_dir, index, channel, percent)
    common.console.print(_channel_line(ch), highlight=False)


@rollout_app.command("status")
def status(
    index: IndexOpt,
    channel: ChannelOpt = "stable",
    collector: Annotated[Path | None, typer.Option(help="Folder of agent reports (default: INDEX/reports if it exists).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the channel and the summary as JSON.")] = False,
) -> None:
    """Show the channel and sum up the agents' reports: devices per version and profile, failures, rollbacks, and the failure rate of the current stage (what `advance` checks).

    Example:\n
      slmops rollout status --index site --collector reports
    """
    from slmops.rollout.channel import read_channel, stage_failures
    from slmops.rollout.status import load_reports, summarize

    ch = read_channel(index, channel)
    folder = collector or (index / "reports" if (index / "reports").is_dir() else None)
    reports = load_reports(folder) if folder is not None else []
    summary = summarize(reports, channel)
    stage = stage_failures(ch, reports)
    if as_json:
        _print_json({"channel": ch.model_dump(by_alias=True, mode="json", exclude={"history"}),
                     "summary": summary, "stage": stage})
        return
    common.console.print(_channel_line(ch), highlight=False)
    if folder is None:
        common.info("no reports (pass --collector DIR)")
        return
    common.console.print(f"{summary['devices']} devices reporting; states: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(summary["states"].items())), highlight=False)
    for row in summary["on"]:
        common.console.print(f"  on {row['version']:<12} {row['profile']:<20} {row['devices']} devices", highlight=False)
    for v, f in summary["failures"].items():
        stages = ", ".join(f"{k} {n}" for k, n in sorted(f["by_stage"].items()))
        common.console.print(f"  FAILED {v}: {f['devices']} devices ({stages}): {', '.join(f['device_ids'][:10])}"
                             + (", ..." if len(f["device_ids"]) > 10 else ""),
                             highlight=False)
    common.console.print(f"{summary['devices_that_rolled_back']} devices have rolled back at least once; "
                         f"current stage {stage['version']}: {stage['failed']} of {stage['tried']} failed "
                         f"({stage['rate']:.1%})", highlight=False)


@rollout_app.command("advance")
def advance(
    index: IndexOpt,
    percent: Annotated[float, typer.Option(help="The new share of devices on the current version, 0-100.")],
    channel: ChannelOpt = "stable",
    collector: Annotated[Path | None, typer.Option(help="Folder of agent reports (default: INDEX/reports if it exists).")] = None,
    max_failure_rate: Annotated[float, typer.Option(help="Refuse while more than this share of the devices that tried the current version failed it (default: 0.05).")] = 0.05,
    force: Annotated[bool, typer.Option("--force", help="Skip the failure-rate check (and allow lowering the share).")] = False,
) -> None:
    """Raise the current version's share; refused (exit 3) while the current stage fails too often.

    Also resumes a halted channel.

    Example:\n
      slmops rollout advance --index site --channel stable --percent 50 --collector reports
    """
    from slmops.rollout.channel import advance as do_advance
    from slmops.rollout.status import load_reports

    folder = collector or (index / "reports" if (index / "reports").is_dir() else None)
    reports = load_reports(folder) if folder is not None else None
    ch = do_advance(index, channel, percent, reports=reports, max_failure_rate=max_failure_rate, force=force)
    common.console.print(_channel_line(ch), highlight=False)


@rollout_app.command("halt")
def halt(
    index: IndexOpt,
    channel: ChannelOpt = "stable",
    reason: Annotated[str, typer.Option(help="Why (kept in the channel's history).")] = "",
) -> None:
    """Stop the rollout: every device goes back to (or stays on) the previous version. `advance` resumes.

    Example:\n
      slmops rollout halt --index site --channel stable --reason "latency regression"
    """
    from slmops.rollout.channel import halt as do_halt

    common.console.print(_channel_line(do_halt(index, channel, reason)), highlight=False)


@rollout_app.command("rollback")
def rollback(
    index: IndexOpt,
    channel: ChannelOpt = "stable",
    reason: Annotated[str, typer.Option(help="Why (kept in the channel's history).")] = "",
) -> None:
    """Point the channel back at the previous version (100%); the current one is withdrawn for good.

    Example:\n
      slmops rollout rollback --index site --channel stable --reason "bad answers on arm"
    """
    from slmops.rollout.channel import rollback as do_rollback

    common.console.print(_channel_line(do_rollback(index, channel, reason)), highlight=False)


@rollout_app.command("collect")
def collect(
    dir: Annotated[Path, typer.Option("--dir", help="Folder to store reports in (one DEVICE.json each).")],  # noqa: A002
    host: Annotated[str, typer.Option(help="Address to listen on (default: 127.0.0.1).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (default: 8780).")] = 8780,
) -> None:
    """Receive agent reports (JSON POST) and keep the latest per device in --dir, for `rollout status`.

    Example:\n
      slmops rollout collect --dir reports --host 0.0.0.0 --port 8780\n
      slmops agent ... --collector http://HOST:8780/report
    """
    from slmops.rollout.status import collector_server

    srv = collector_server(dir, host, port)
    common.info(f"collecting reports into {dir} at http://{host}:{srv.server_address[1]}/report")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()


@app.command("agent")
def agent(
    index: Annotated[str, typer.Option("--index", help="The channel index: an http(s) URL or a folder.")],
    device_id: Annotated[str, typer.Option("--device-id", help="This device's id (its rollout bucket is a hash of channel and id).")],
    profile: Annotated[str, typer.Option("--profile", help="This device's profile, e.g. cpu-avx2-8gb (a key of the blueprint).")],
    home: Annotated[Path, typer.Option("--home", help="The agent's folder: versions/, current -> versions/V, state, logs.")],
    channel: ChannelOpt = "stable",
    collector: Annotated[str | None, typer.Option(help="Where to report: an http(s) URL (JSON POST) or a folder (default: none).")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls (default: 60).")] = 60.0,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit (exit 1 when this poll refused or rolled back a version).")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Run `slmops serve` on the current version and restart it on every switch (default: off).")] = False,
    serve_port: Annotated[int, typer.Option(help="Port of the local server (default: 8000).")] = 8000,
    ready_timeout: Annotated[float, typer.Option(help="Seconds a new server has to answer /ready before the agent switches back (default: 180).")] = 180.0,
    metrics_port: Annotated[int | None, typer.Option(help="Expose the agent's Prometheus metrics on this port (default: off).")] = None,
    keep_versions: Annotated[int, typer.Option(help="Versions kept under HOME/versions (default: 3).")] = 3,
) -> None:
    """Run on a device: poll the index, take this device's share of a rollout, verify, smoke-test, switch.

    Each poll reads INDEX/channels/CHANNEL.json; the device is inside the rollout when int(sha256("CHANNEL:DEVICE_ID")[:8], 16) % 10000 < PERCENT*100 (nested stages). It downloads its profile's bundle, checks bundle.json against the channel file and every file against bundle.json (a mismatch is refused), runs the smoke test, switches HOME/current atomically, restarts its server (--serve), and rolls back by itself when the smoke test fails or the server is not ready. Each poll prints its report as one JSON line.

    Examples:\n
      slmops agent --index https://models.example.com/fleet --device-id shop-17 --profile cpu-arm-4gb --home /var/lib/slmops --serve --collector https://ops.example.com/report\n
      slmops agent --index site --device-id dev-1 --profile cpu-avx2-8gb --home dev1 --once
    """
    from slmops.rollout.agent import FAILED_STATES, Agent, AgentConfig

    cfg = AgentConfig(index=index, device_id=device_id, profile=profile, home=home, channel=channel,
                      collector=collector, serve=serve, serve_port=serve_port, ready_timeout=ready_timeout,
                      keep_versions=keep_versions, metrics_port=metrics_port)

    def show(report: dict) -> None:
        typer.echo(json.dumps(report, ensure_ascii=False), nl=True)
        common.info(f"{report['device_id']}: {report['state']}: {report['message']}")

    last = Agent(cfg).run(interval=interval, once=once, on_report=show)
    if once and last["state"] in FAILED_STATES:
        raise typer.Exit(1)

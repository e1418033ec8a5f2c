"""Device profiles, bundles and staged rollout to a fleet of edge devices (see docs/rollout.md).

- :mod:`slmops.rollout.blueprint`: the blueprint YAML (device profile -> variant + smoke test);
- :mod:`slmops.rollout.bundle`: `build_bundles` (one verified, versioned folder per profile);
- :mod:`slmops.rollout.channel`: the static channel index (`publish`, `advance`, `halt`, `rollback`) and
  the deterministic percentage function `in_rollout`;
- :mod:`slmops.rollout.agent`: the device agent (poll, verify, smoke-test, switch, serve, roll back, report);
- :mod:`slmops.rollout.status`: agent reports, collectors and `summarize`.

Imports here are light (no torch); the agent loads models only inside its smoke test.
"""

from slmops.rollout.blueprint import Blueprint, load_blueprint
from slmops.rollout.bundle import BundleResult, build_bundles, verify_bundle_dir
from slmops.rollout.channel import (
    BUCKET_FUNCTION,
    ChannelFile,
    advance,
    bucket,
    halt,
    in_rollout,
    publish,
    read_channel,
    rollback,
    stage_failures,
)
from slmops.rollout.status import load_reports, summarize

__all__ = ["BUCKET_FUNCTION", "Blueprint", "BundleResult", "ChannelFile", "advance", "bucket", "build_bundles",
           "halt", "in_rollout", "load_blueprint", "load_reports", "publish", "read_channel", "rollback",
           "stage_failures", "summarize", "verify_bundle_dir"]

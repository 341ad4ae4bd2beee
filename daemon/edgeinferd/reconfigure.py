"""What ``systemctl reload`` changes in a running daemon, and what only a restart can.

On SIGHUP the daemon reads its TOML file again. Settings that a running
daemon can take on without dropping a call (the log level, the shutdown
grace period, who may load and unload models) are applied. Settings bound
to something already open (the sockets, the TLS files, the metrics listener,
the worker threads, the repository the models were loaded from) keep their
running value; each one that changed on disk is named in a warning, so the
operator knows a restart is still owed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgeinferd.config import DaemonConfig

__all__ = ["LISTEN", "RELOADABLE", "RESTART_ONLY", "Reconfiguration", "reconfigure"]

# DaemonConfig attribute -> the TOML key an operator edits.
RELOADABLE = {
    "log_level": "logging.level",
    "grace_period_s": "shutdown.grace_period_s",
    "management": "management.allow",
}
RESTART_ONLY = {
    "repository": "repository",
    "log_format": "logging.format",
    "worker_threads": "runtime.worker_threads",
    "metrics_listen": "metrics.listen",
}
# ListenConfig attribute -> TOML key; every one of them needs a restart.
LISTEN = {
    "unix": "listen.unix",
    "unix_mode": "listen.unix_mode",
    "unix_group": "listen.unix_group",
    "tcp": "listen.tcp",
    "tls": "listen.tls",
    "max_message_bytes": "listen.max_message_bytes",
}


@dataclass(frozen=True)
class Reconfiguration:
    """The outcome of comparing the running configuration with the file."""

    #: What the daemon runs with from now on: reloadable values from the file,
    #: everything else as it was.
    config: DaemonConfig
    #: TOML key -> (old, new) for each applied change.
    applied: dict[str, tuple[object, object]]
    #: TOML keys changed in the file that keep their running value until a restart.
    needs_restart: list[str]


def reconfigure(running: DaemonConfig, on_disk: DaemonConfig) -> Reconfiguration:
    """Split the differences between ``running`` and ``on_disk`` into applied and deferred."""
    applied: dict[str, tuple[object, object]] = {}
    for attribute, key in RELOADABLE.items():
        old, new = getattr(running, attribute), getattr(on_disk, attribute)
        if old != new:
            applied[key] = (old, new)
    needs_restart = [
        key
        for attribute, key in RESTART_ONLY.items()
        if getattr(running, attribute) != getattr(on_disk, attribute)
    ]
    needs_restart += [
        key
        for attribute, key in LISTEN.items()
        if getattr(running.listen, attribute) != getattr(on_disk.listen, attribute)
    ]
    config = replace(running, **{a: getattr(on_disk, a) for a in RELOADABLE})
    return Reconfiguration(config, applied, needs_restart)

"""`systemctl reload` (SIGHUP) re-reads the daemon's own TOML: what it applies, what it defers."""

from __future__ import annotations

import io
import json
import signal
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import structlog

import edgeinfer
from edgeinferd import logs
from edgeinferd.config import DaemonConfig, ListenConfig, load_config
from edgeinferd.reconfigure import LISTEN, RELOADABLE, RESTART_ONLY, reconfigure
from tests import models
from tests.conftest import Daemon, StartDaemon


def test_every_setting_has_a_reload_rule() -> None:
    """A setting added to the config without a decision here would be silently ignored."""
    assert {f.name for f in fields(DaemonConfig)} == {
        *RELOADABLE,
        *RESTART_ONLY,
        "listen",
        "source",
    }
    assert {f.name for f in fields(ListenConfig)} == set(LISTEN)


def test_reloadable_settings_apply_and_the_rest_wait_for_a_restart(tmp_path: Path) -> None:
    """Level, grace period and management come from the file; a new socket path or worker
    count is named as needing a restart and keeps its running value."""
    config = tmp_path / "edgeinferd.toml"
    config.write_text('[listen]\nunix = "/run/a.sock"\n')
    running = load_config(config)
    config.write_text(
        '[listen]\nunix = "/run/b.sock"\n[logging]\nlevel = "debug"\n'
        '[shutdown]\ngrace_period_s = 3\n[management]\nallow = "none"\n'
        "[runtime]\nworker_threads = 4\n"
    )
    change = reconfigure(running, load_config(config))
    assert change.applied == {
        "logging.level": ("info", "debug"),
        "shutdown.grace_period_s": (10.0, 3.0),
        "management.allow": ("all", "none"),
    }
    assert change.needs_restart == ["runtime.worker_threads", "listen.unix"]
    assert change.config.listen.unix == Path("/run/a.sock")
    assert change.config.worker_threads == running.worker_threads
    assert (change.config.log_level, change.config.management) == ("debug", "none")
    assert reconfigure(running, running).applied == {}


def test_set_level_reaches_loggers_already_used() -> None:
    """structlog caches each logger on first use; set_level still changes what it drops."""
    stream = io.StringIO()
    logs.configure_logging("info", "json", stream)
    log = structlog.get_logger("edgeinferd.test")
    log.debug("hidden")
    log.info("shown")
    logs.set_level("debug")
    log.debug("now shown")
    logs.set_level("error")
    log.warning("hidden again")
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["shown", "now shown"]


def wait_for_event(daemon: Daemon, event: str, after: int, timeout: float = 60) -> list[dict]:
    """The daemon's JSON log lines from line ``after`` on, once one has ``event``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [json.loads(line) for line in daemon.log_text().splitlines()[after:]]
        if any(line.get("event") == event for line in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} in the log:\n{daemon.log_text()}")


def reload(daemon: Daemon, config: str) -> list[dict]:
    """Rewrite the daemon's TOML, send SIGHUP, return the log lines of that reload."""
    daemon.config.write_text(config.replace("@SOCKET@", str(daemon.socket)))
    after = len(daemon.log_text().splitlines())
    daemon.signal(signal.SIGHUP)
    return wait_for_event(daemon, "reloaded", after)


def test_sighup_rereads_the_daemon_config(start_daemon: StartDaemon, tmp_path: Path) -> None:
    """A real daemon: after SIGHUP the new level and management policy are in force; a
    changed socket path is logged as needing a restart and the old socket keeps serving;
    a broken file is reported and changes nothing."""
    repo = tmp_path / "repo"
    models.add_mlp(repo)
    daemon = start_daemon(repo, '[logging]\nformat = "json"\n')
    base = f'repository = "{repo}"\n[listen]\nunix = "@SOCKET@"\n[logging]\nformat = "json"\n'
    x = np.zeros((1, 16), np.float32)

    lines = reload(
        daemon,
        base.replace('unix = "@SOCKET@"', f'unix = "{tmp_path}/moved.sock"')
        + 'level = "debug"\n[management]\nallow = "none"\n',
    )
    applied = {line["setting"]: line["new"] for line in lines if line["event"] == "config reloaded"}
    assert applied == {"logging.level": "debug", "management.allow": "none"}
    (deferred,) = [line for line in lines if line["event"].startswith("config changes need")]
    assert (deferred["level"], deferred["settings"]) == ("warning", "listen.unix")
    with daemon.client(timeout=30) as client:
        after = len(daemon.log_text().splitlines())
        client.predict("mlp", {"x": x}, request_id="after-reload")
        requests = wait_for_event(daemon, "request", after)
        assert [r["request_id"] for r in requests if r["event"] == "request"] == ["after-reload"]
        with pytest.raises(edgeinfer.EdgeInferError) as refused:
            client.unload_model("mlp")
        assert refused.value.code.name == "PERMISSION_DENIED"
    assert not (tmp_path / "moved.sock").exists()

    lines = reload(daemon, base + "bogus = 1\n")
    (error,) = [line for line in lines if line["event"].startswith("config not reloaded")]
    assert "bogus" in error["reason"]
    with daemon.client(timeout=30) as client:
        with pytest.raises(edgeinfer.EdgeInferError):
            client.unload_model("mlp")  # still "none": the broken file changed nothing
        assert client.predict("mlp", {"x": x})["y"].shape == (1, 4)

"""``edgeinferd``: run the daemon, or one of its tools.

    edgeinferd [--config FILE] [--repository DIR] [--unix PATH] [--tcp HOST:PORT]
    edgeinferd compress RECIPE.toml      (the compression toolchain)
    edgeinferd import SOURCE --repository DIR --name NAME  (a .gguf file or Hugging Face folder)
    edgeinferd install|uninstall ...     (systemd installation)

Config -> server -> CLI, in three layers, as uvicorn does: this module only
parses arguments, sets up logging and signals, and runs ``Server``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import structlog

from edgeinferd import journal
from edgeinferd.config import DaemonConfig, load_config, with_overrides
from edgeinferd.errors import EdgeInferError
from edgeinferd.logs import configure_logging
from edgeinferd.systemd import SystemdNotifier
from edgeinferd.tasks import spawn

log = structlog.get_logger("edgeinferd")

EXIT_STARTUP_FAILED = 1
#: sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= does not retry a
#: configuration that cannot work until someone edits it.
EXIT_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeinferd",
        description="Serve PyTorch models from a model repository over gRPC.",
        epilog="Tools: 'edgeinferd compress RECIPE', 'edgeinferd import SOURCE',"
        " 'edgeinferd install', 'edgeinferd uninstall'.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults)")
    parser.add_argument(
        "--repository", type=Path, help="model repository folder (overrides the config)"
    )
    parser.add_argument("--unix", type=Path, help="Unix socket path (overrides the config)")
    parser.add_argument("--tcp", help="also listen on HOST:PORT (overrides the config)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "compress":
        from edgeinferd.compress.cli import main as compress_main

        return compress_main(argv[1:])
    if argv and argv[0] == "import":
        from edgeinferd.importer.cli import main as import_main

        return import_main(argv[1:])
    if argv and argv[0] in ("install", "uninstall"):
        from edgeinferd.install import main as install_main

        return install_main(argv)

    args = build_parser().parse_args(argv)

    def read_config() -> DaemonConfig:
        """The file with the command line on top, at start and on every reload."""
        config = with_overrides(load_config(args.config), args.repository, args.unix, args.tcp)
        return replace(config, log_level=args.log_level) if args.log_level else config

    try:
        config = read_config()
    except EdgeInferError as error:
        _fatal(str(error))
        return EXIT_CONFIG
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config, read_config))
    except EdgeInferError as error:
        log.error("cannot start", reason=str(error))
        if not journal.stderr_is_journal():  # there, the entry above is the one line
            _fatal(str(error))
        return EXIT_STARTUP_FAILED


def _fatal(message: str) -> None:
    """One line on stderr; under systemd at priority err, so ``journalctl -p err`` shows it."""
    prefix = "<3>" if journal.stderr_is_journal() else ""
    print(f"{prefix}edgeinferd: {message}", file=sys.stderr)


async def serve(config: DaemonConfig, reread: Callable[[], DaemonConfig] | None = None) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once; SIGHUP reloads."""
    # Unset NOTIFY_SOCKET & co. so that no child process talks to systemd for us.
    notifier = SystemdNotifier.from_environment(unset_environment=True)
    # Imported here, not at the top: it brings in torch (seconds on a small
    # device), and a config error should fail at once.
    from edgeinferd.server import Server

    server = Server(config, notifier, reread)
    loop = asyncio.get_running_loop()
    stopping = False

    def on_stop_signal(signum: int) -> None:
        nonlocal stopping
        if stopping:
            log.warning("second signal; exiting now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        stopping = True
        grace = server.config.grace_period_s  # as the last reload left it
        log.info("shutting down", signal=signal.Signals(signum).name, grace_s=grace)
        server.close()

    def on_reload_signal() -> None:
        spawn(server.reload(), "reload")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)

    await server.start()
    await server.wait_closed()
    log.info("stopped")
    return 0

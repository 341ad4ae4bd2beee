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
from pathlib import Path

import structlog

from edgeinferd.config import DaemonConfig, load_config, with_overrides
from edgeinferd.errors import EdgeInferError
from edgeinferd.logs import configure_logging
from edgeinferd.server import Server
from edgeinferd.systemd import SystemdNotifier

log = structlog.get_logger("edgeinferd")

EXIT_STARTUP_FAILED = 1


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
    try:
        config = with_overrides(load_config(args.config), args.repository, args.unix, args.tcp)
    except EdgeInferError as error:
        print(f"edgeinferd: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    configure_logging(args.log_level or config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config))
    except EdgeInferError as error:
        log.error("cannot start", reason=str(error))
        print(f"edgeinferd: {error}", file=sys.stderr)
        return EXIT_STARTUP_FAILED


async def serve(config: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; a second signal exits at once."""
    # Unset NOTIFY_SOCKET & co. so that no child process talks to systemd for us.
    server = Server(config, SystemdNotifier.from_environment(unset_environment=True))
    loop = asyncio.get_running_loop()
    stopping = False

    def on_stop_signal(signum: int) -> None:
        nonlocal stopping
        if stopping:
            log.warning("second signal; exiting now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        stopping = True
        log.info("shutting down", signal=signal.Signals(signum).name, grace_s=config.grace_period_s)
        server.close()

    def on_reload_signal() -> None:
        task = asyncio.ensure_future(server.reload())
        task.add_done_callback(lambda t: t.exception())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)

    await server.start()
    await server.wait_closed()
    log.info("stopped")
    return 0

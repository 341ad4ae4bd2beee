"""The daemon's configuration: one TOML file, validated once at start-up.

Every setting has a default, so ``edgeinferd`` runs with no file at all; the
file (``--config``) overrides what it names. Relative paths are resolved
against the file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeinferd.errors import ConfigError
from edgeinferd.toml_fields import Table, load_toml

DEFAULT_SOCKET = "/run/edgeinfer/edgeinfer.sock"
DEFAULT_REPOSITORY = "/var/lib/edgeinfer/models"


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key; with ``client_ca`` set, callers must present a cert."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ListenConfig:
    #: Unix socket path; None to listen on TCP only.
    unix: Path | None = Path(DEFAULT_SOCKET)
    #: The socket file's permission bits: owner and group may connect.
    unix_mode: int = 0o660
    #: Group to own the socket file (default: the daemon's own group).
    unix_group: str | None = None
    #: "host:port" for TCP; off unless configured.
    tcp: str | None = None
    tls: TlsConfig | None = None
    #: Largest request or response message, in bytes.
    max_message_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class DaemonConfig:
    repository: Path = Path(DEFAULT_REPOSITORY)
    listen: ListenConfig = field(default_factory=ListenConfig)
    #: debug, info, warning, error
    log_level: str = "info"
    #: auto (JSON unless a terminal), json, console
    log_format: str = "auto"
    #: Seconds that in-flight calls and streams get to finish on SIGTERM.
    grace_period_s: float = 10.0
    #: Who may load and unload models: "all", "unix" (Unix-socket callers only) or "none".
    management: str = "all"
    #: Threads for generative models' decoding steps (classifiers get one thread per instance).
    worker_threads: int = 2
    #: "host:port" for the Prometheus endpoint; off unless configured.
    metrics_listen: str | None = None
    #: Where the configuration came from (for messages and reload).
    source: Path | None = None


def load_config(path: Path | None) -> DaemonConfig:
    """Read and validate a config file; ``None`` gives the defaults."""
    if path is None:
        return DaemonConfig()
    path = path.resolve()
    root = Table(load_toml(path), str(path))
    base = path.parent

    def resolve(value: str) -> Path:
        return (base / os.path.expanduser(value)).resolve()

    repository = resolve(root.string("repository", DEFAULT_REPOSITORY))

    listen_table = root.table("listen")
    unix = listen_table.string("unix", DEFAULT_SOCKET)
    mode_text = listen_table.string("unix_mode", "0660")
    try:
        unix_mode = int(mode_text, 8)
    except ValueError:
        raise listen_table.error(
            "unix_mode", f"expected an octal string like '0660', got {mode_text!r}"
        ) from None
    if not 0 <= unix_mode <= 0o777:
        raise listen_table.error(
            "unix_mode", f"expected permission bits 0000-0777, got {mode_text!r}"
        )
    tcp = listen_table.string("tcp", None)
    if tcp is not None:
        _check_host_port(listen_table, "tcp", tcp)
    tls_table = listen_table.table("tls")
    tls = None
    if tls_table.data:
        ca = tls_table.string("client_ca", None)
        tls = TlsConfig(
            cert=resolve(tls_table.string("cert")),
            key=resolve(tls_table.string("key")),
            client_ca=resolve(ca) if ca else None,
        )
        tls_table.finish()
    listen = ListenConfig(
        unix=resolve(unix) if unix else None,
        unix_mode=unix_mode,
        unix_group=listen_table.string("unix_group", None),
        tcp=tcp,
        tls=tls,
        max_message_bytes=listen_table.integer(
            "max_message_bytes", 64 * 1024 * 1024, minimum=1024, maximum=2**31 - 1
        ),
    )
    if listen.unix is None and listen.tcp is None:
        raise listen_table.error("unix", "no listener: set listen.unix or listen.tcp")
    if tls is not None and tcp is None:
        raise tls_table.error("cert", "TLS is configured but listen.tcp is not set")
    listen_table.finish()

    logging_table = root.table("logging")
    log_level = logging_table.choice("level", ["debug", "info", "warning", "error"], "info")
    log_format = logging_table.choice("format", ["auto", "json", "console"], "auto")
    logging_table.finish()

    shutdown_table = root.table("shutdown")
    grace = shutdown_table.number("grace_period_s", 10.0, minimum=0, maximum=3600)
    shutdown_table.finish()

    management_table = root.table("management")
    management = management_table.choice("allow", ["all", "unix", "none"], "all")
    management_table.finish()

    runtime_table = root.table("runtime")
    worker_threads = runtime_table.integer("worker_threads", 2, minimum=1, maximum=256)
    runtime_table.finish()

    metrics_table = root.table("metrics")
    metrics_listen = metrics_table.string("listen", None)
    if metrics_listen is not None:
        _check_host_port(metrics_table, "listen", metrics_listen)
    metrics_table.finish()

    root.finish()
    return DaemonConfig(
        repository=repository,
        listen=listen,
        log_level=log_level,
        log_format=log_format,
        grace_period_s=grace,
        management=management,
        worker_threads=worker_threads,
        metrics_listen=metrics_listen,
        source=path,
    )


def _check_host_port(table: Table, key: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise table.error(key, f"expected 'host:port' (port 0-65535), got {value!r}")


def with_overrides(
    config: DaemonConfig,
    repository: Path | None = None,
    unix: Path | None = None,
    tcp: str | None = None,
) -> DaemonConfig:
    """Apply command-line overrides on top of the file."""
    listen = config.listen
    if unix is not None:
        listen = replace(listen, unix=unix.resolve())
    if tcp is not None:
        host, sep, port = tcp.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError("--tcp", "", f"expected 'host:port' (port 0-65535), got {tcp!r}")
        listen = replace(listen, tcp=tcp)
    return replace(
        config,
        repository=repository.resolve() if repository else config.repository,
        listen=listen,
    )

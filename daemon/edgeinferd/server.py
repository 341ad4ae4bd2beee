"""The gRPC server: binds its sockets, serves the data plane, shuts down gracefully.

Like grpclib's server, ``start()`` returns once the sockets are bound and the
models are loaded; ``close()`` begins a graceful stop and ``wait_closed()``
waits for it, so callers (the CLI, tests, embedders) control each step.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import socket
import ssl
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgeinferd.config import DaemonConfig
from edgeinferd.dataplane import DataPlane
from edgeinferd.errors import EdgeInferError
from edgeinferd.logs import set_level
from edgeinferd.metrics import MetricsEndpoint, start_metrics_server
from edgeinferd.models import ModelEntry, ModelManager, ModelState
from edgeinferd.peers import CredentialsServer, credentials_path
from edgeinferd.protocol import add_services
from edgeinferd.protocol.boundary import ErrorBoundary
from edgeinferd.reconfigure import reconfigure
from edgeinferd.repository import Repository
from edgeinferd.systemd import SystemdNotifier
from edgeinferd.tasks import spawn

log = structlog.get_logger("edgeinferd.server")


class StartupError(EdgeInferError):
    """The daemon cannot start (socket in use, bad TLS files...); one-line reason."""


class Server:
    def __init__(
        self,
        config: DaemonConfig,
        notifier: SystemdNotifier | None = None,
        reread: Callable[[], DaemonConfig] | None = None,
    ) -> None:
        self.config = config
        #: Reads the configuration again on reload (the CLI's file and overrides).
        self._reread = reread
        #: Tells systemd when the daemon is ready, reloading or stopping (no-op outside it).
        self.notifier = notifier or SystemdNotifier(None)
        self._ready = False
        self._watchdog: asyncio.Task[None] | None = None
        self.executor = ThreadPoolExecutor(config.worker_threads, thread_name_prefix="generation")
        self.health = health.aio.HealthServicer()
        self.models = ModelManager(
            Repository(config.repository), self.executor, self._model_changed
        )
        self.dataplane = DataPlane(self.models, config.management)
        self.tcp_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._closed = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None
        self.credentials = CredentialsServer(self.dataplane.peers)
        self._metrics: MetricsEndpoint | None = None

    @property
    def addresses(self) -> list[str]:
        """Where callers can reach the daemon (for logs and STATUS=)."""
        result = []
        if self.config.listen.unix is not None:
            result.append(f"unix://{self.config.listen.unix}")
        if self.tcp_port is not None and self.config.listen.tcp is not None:
            host = self.config.listen.tcp.rpartition(":")[0]
            result.append(f"{host}:{self.tcp_port}")
        return result

    def status_line(self) -> str:
        entries = self.models.entries()
        ready = [e.name for e in entries if e.state is ModelState.READY]
        failed = [e.name for e in entries if e.state is ModelState.FAILED]
        line = f"serving {len(ready)} model(s)" + (f": {', '.join(ready)}" if ready else "")
        if failed:
            line += f"; failed: {', '.join(failed)}"
        return line

    async def start(self) -> None:
        """Load the repository, bind every listener, start serving; returns once bound."""
        listen = self.config.listen
        options = [
            ("grpc.max_receive_message_length", listen.max_message_bytes),
            ("grpc.max_send_message_length", listen.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options, interceptors=[ErrorBoundary()])
        service_names = add_services(server, self.dataplane)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        service_names += [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(service_names, server)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

        root = self.config.repository
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise StartupError(f"model repository {root} {what}")
        await self.models.load_all()

        if listen.unix is not None:
            self._bind_unix(server, listen.unix)
            await self.credentials.start(
                credentials_path(listen.unix), listen.unix_mode, self._unix_gid()
            )
        if listen.tcp is not None:
            self.tcp_port = self._bind_tcp(server, listen.tcp)
        if self.config.metrics_listen is not None:
            try:
                self._metrics = await start_metrics_server(
                    self.config.metrics_listen, self.dataplane.metrics, self.models
                )
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on {self.config.metrics_listen}: {error.strerror}"
                ) from None
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", addresses=self.addresses, status=self.status_line())
        # Only now: sockets listen and every model is loaded and warmed up.
        self._ready = True
        self.notifier.ready(self.status_line())
        self._watchdog = spawn(self.notifier.run_watchdog(), "watchdog")

    def _bind_unix(self, server: grpc.aio.Server, path: Path) -> None:
        if path.parent.exists() and not path.parent.is_dir():
            raise StartupError(f"cannot listen on unix:{path}: {path.parent} is not a folder")
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as error:
            raise StartupError(
                f"cannot create the socket folder {path.parent}: {error.strerror}"
            ) from None
        _refuse_live_socket(path)
        # The socket is created under the umask: make it no wider than asked,
        # so there is no moment when others could connect.
        old_umask = os.umask(0o777 & ~self.config.listen.unix_mode)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as error:
            raise StartupError(f"cannot listen on unix:{path}: {error}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, self.config.listen.unix_mode)
        gid = self._unix_gid()
        if gid is not None:
            try:
                os.chown(path, -1, gid)
            except PermissionError as error:
                raise StartupError(f"cannot give {path} to its group: {error}") from None

    def _unix_gid(self) -> int | None:
        group = self.config.listen.unix_group
        if group is None:
            return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(
                f"cannot give the socket to group {group!r}: no such group"
            ) from None

    def _bind_tcp(self, server: grpc.aio.Server, address: str) -> int:
        tls = self.config.listen.tls
        try:
            if tls is None:
                port = server.add_insecure_port(address)
            else:
                try:
                    key, cert = tls.key.read_bytes(), tls.cert.read_bytes()
                    ca = tls.client_ca.read_bytes() if tls.client_ca else None
                except OSError as error:
                    raise StartupError(f"cannot read TLS file: {error}") from None
                _check_tls(tls.cert, tls.key, tls.client_ca)
                credentials = grpc.ssl_server_credentials(
                    [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
                )
                port = server.add_secure_port(address, credentials)
        except RuntimeError as error:
            raise StartupError(f"cannot listen on {address}: {error}") from None
        if port == 0:
            raise StartupError(f"cannot listen on {address}: address in use or not available")
        return port

    def close(self, grace: float | None = None) -> None:
        """Begin a graceful stop: refuse new calls, let running ones finish within ``grace``."""
        if self._closing is None:
            self.notifier.stopping()
            self.dataplane.draining = True
            self._closing = spawn(
                self._close(self.config.grace_period_s if grace is None else grace), "close"
            )

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _close(self, grace: float) -> None:
        try:
            await self.health.enter_graceful_shutdown()
            if self._server is not None:
                await self._server.stop(grace)
            await self.models.close()
        finally:
            await self.credentials.close()
            if self._metrics is not None:
                await self._metrics.close()
            self.dataplane.shared_memory.clear()
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)
            if self.config.listen.unix is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.config.listen.unix.unlink()
            self._closed.set()

    async def reload(self) -> None:
        """Re-read the config file and the repository (SIGHUP); calls in flight are not failed."""
        self.notifier.reloading()
        self._ready = False
        try:
            self._reload_config()
            await self.models.reload()
        finally:
            self._ready = True
            self.notifier.ready(self.status_line())
        log.info("reloaded", status=self.status_line())

    def _reload_config(self) -> None:
        """Apply what a reload may change; name what still needs a restart."""
        if self._reread is None:
            return
        try:
            on_disk = self._reread()
        except EdgeInferError as error:
            log.error("config not reloaded; the running one stays", reason=str(error))
            return
        change = reconfigure(self.config, on_disk)
        self.config = change.config
        set_level(self.config.log_level)
        self.dataplane.management = self.config.management
        for key, (old, new) in change.applied.items():
            log.info("config reloaded", setting=key, old=old, new=new)
        if change.needs_restart:
            log.warning(
                "config changes need a restart; the running values stay",
                settings=",".join(change.needs_restart),
            )

    def _model_changed(self, entry: ModelEntry) -> None:
        if self._ready:
            self.notifier.status(self.status_line())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if entry.state is ModelState.READY
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        spawn(self.health.set(entry.name, status), f"health {entry.name}")


def _check_tls(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Name the TLS file that is wrong; gRPC only says "Failed to bind to address"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as error:
        raise StartupError(
            f"TLS certificate {cert} and key {key} do not load as a PEM certificate chain"
            f" and its private key: {error.reason or error}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as error:
            raise StartupError(
                f"TLS client CA {client_ca} is not a PEM certificate: {error.reason or error}"
            ) from None


def _refuse_live_socket(path: Path) -> None:
    """Fail if another process answers on ``path``; remove it if it is stale."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as error:
        if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)  # left behind by a process that died
            return
        raise StartupError(f"cannot listen on unix:{path}: {error.strerror}") from None
    else:
        raise StartupError(f"cannot listen on unix:{path}: another process is serving on it")
    finally:
        probe.close()

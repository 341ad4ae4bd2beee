"""Who is calling over the Unix socket: a kernel-attested uid, bound to a token.

gRPC (the Python server included) tells a handler nothing about the process
at the other end of a Unix socket: its peer string is just ``unix:``. Yet
shared memory needs to know who registered a region, so that only that user
may use, list or drop it, and only objects that user owns are read.

So the daemon listens on a second socket next to the gRPC one
(``<socket>.cred``, same mode and group). A client connects there once; the
daemon reads the peer's uid with ``SO_PEERCRED`` (which the client cannot
forge) and answers with a random token that stands for that uid. The client
then sends the token as the ``edgeinfer-peer-token`` metadata of its
shared-memory calls on the gRPC socket. One token per uid, for the daemon's
life; the table is bounded by the number of distinct uids that connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
from pathlib import Path

import structlog

log = structlog.get_logger("edgeinferd.peers")

#: The metadata key a client sends its token under.
TOKEN_METADATA = "edgeinfer-peer-token"
#: Where the credentials socket lives, relative to the gRPC socket.
CREDENTIALS_SUFFIX = ".cred"
#: Distinct uids remembered; beyond it new uids are refused (uids are not caller-chosen
#: strings, but the table is still bounded).
MAX_UIDS = 4096

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def credentials_path(unix_socket: Path) -> Path:
    """The credentials socket that belongs to the gRPC socket at ``unix_socket``."""
    return unix_socket.with_name(unix_socket.name + CREDENTIALS_SUFFIX)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(data)[1])


class PeerTokens:
    """Tokens handed out on the credentials socket, one per uid."""

    def __init__(self, max_uids: int = MAX_UIDS) -> None:
        self.max_uids = max_uids
        self._by_uid: dict[int, str] = {}
        self._by_token: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_uid)

    def issue(self, uid: int) -> str | None:
        """The token for ``uid`` (made on first use); None when the table is full."""
        token = self._by_uid.get(uid)
        if token is None:
            if len(self._by_uid) >= self.max_uids:
                return None
            token = secrets.token_hex(16)
            self._by_uid[uid] = token
            self._by_token[token] = uid
        return token

    def uid(self, token: str) -> int | None:
        """The uid a token stands for, or None for an unknown token."""
        return self._by_token.get(token)


class CredentialsServer:
    """The second Unix socket: connect, get your uid's token, disconnect."""

    def __init__(self, tokens: PeerTokens) -> None:
        self.tokens = tokens
        self.path: Path | None = None
        self._server: asyncio.base_events.Server | None = None

    async def start(self, path: Path, mode: int, gid: int | None) -> None:
        _remove_stale(path)
        old_umask = os.umask(0o777 & ~mode)
        try:
            self._server = await asyncio.start_unix_server(self._answer, path=str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        self.path = path

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            token = self.tokens.issue(peer_uid(sock))
            writer.write(((token or "") + "\n").encode())
            await writer.drain()
        except OSError as error:
            log.warning("credentials socket: cannot answer a peer", error=str(error))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _remove_stale(path: Path) -> None:
    """A socket left by a daemon that died (the gRPC socket beside it proved none is live)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()

"""POSIX shared-memory regions registered by callers on the same device.

A caller creates an object in /dev/shm, registers (name, key, offset, size)
once, then refers to slices of it from tensors instead of sending the bytes.
This mirrors Triton's system shared-memory extension, with three rules that
keep one caller from harming the daemon or another caller:

- A region belongs to the uid that registered it (learned from the kernel,
  see ``edgeinferd.peers``). Other uids cannot see, use or unregister it,
  and the object itself must be owned by that uid: the daemon (often root)
  never reads or writes anyone else's memory on a caller's behalf.
- Nothing is mapped and no descriptor is kept. Every use opens the object,
  checks it again (owner, not world-writable, still large enough) and copies
  with ``pread``/``pwrite``, which return short instead of faulting when the
  caller has shrunk the object: a mapping would die of SIGBUS there.
- Each uid may hold at most ``MAX_REGIONS_PER_UID`` regions and
  ``MAX_BYTES_PER_UID`` registered bytes.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinferd.errors import InvalidInput, ModelNotFound, Overloaded, PermissionDenied

SHM_ROOT = Path("/dev/shm")
_KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,200}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")

MAX_REGIONS_PER_UID = 64
MAX_BYTES_PER_UID = 16 << 30

NOT_ON_UNIX = (
    "shared memory is only for callers on this device's Unix socket that present their"
    " peer token (edgeinfer-peer-token from the credentials socket); send the tensors"
    " in the message instead"
)


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    uid: int


class SharedMemoryRegistry:
    def __init__(
        self,
        root: Path = SHM_ROOT,
        max_regions: int = MAX_REGIONS_PER_UID,
        max_bytes: int = MAX_BYTES_PER_UID,
    ) -> None:
        self.root = root
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self._regions: dict[int, dict[str, Region]] = {}

    def regions(self, uid: int | None) -> list[Region]:
        """The regions ``uid`` registered, by name (nobody sees another uid's)."""
        owned = self._regions.get(_require(uid), {})
        return [owned[name] for name in sorted(owned)]

    def count(self) -> int:
        """Regions registered by every uid together."""
        return sum(len(owned) for owned in self._regions.values())

    def get(self, uid: int | None, name: str) -> Region:
        region = self._regions.get(_require(uid), {}).get(name)
        if region is None:
            # The same answer whether another uid has a region of that name or not.
            raise InvalidInput(f"shared-memory region {name[:64]!r} is not registered")
        return region

    def register(self, uid: int | None, name: str, key: str, offset: int, byte_size: int) -> Region:
        uid = _require(uid)
        if not _NAME.fullmatch(name):
            raise InvalidInput(
                f"shared-memory region name {name[:64]!r} is invalid:"
                " expected 1-128 of A-Z a-z 0-9 _ . -"
            )
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(
                f"shared-memory key {key[:64]!r} is invalid:"
                " expected a POSIX name like /edgeinfer-1"
            )
        if byte_size <= 0:
            raise InvalidInput(f"shared-memory region {name!r} needs a byte_size > 0")
        if offset < 0:
            raise InvalidInput(f"shared-memory region {name!r} needs an offset >= 0")
        owned = self._regions.get(uid, {})
        if name in owned:
            raise InvalidInput(f"shared-memory region {name!r} is already registered")
        if len(owned) >= self.max_regions:
            raise Overloaded(
                f"this user already has {len(owned)} shared-memory regions, the most allowed;"
                " unregister one first"
            )
        held = sum(r.byte_size for r in owned.values())
        if held + byte_size > self.max_bytes:
            raise Overloaded(
                f"registering {byte_size} more bytes would give this user {held + byte_size}"
                f" bytes of shared memory; at most {self.max_bytes} are allowed"
            )
        region = Region(name, key, offset, byte_size, uid)
        fd = self._open(region, os.O_RDONLY)
        os.close(fd)
        self._regions.setdefault(uid, {})[name] = region
        return region

    def unregister(self, uid: int | None, name: str) -> None:
        """Forget one of ``uid``'s regions (nothing is mapped, so nothing to unmap)."""
        uid = _require(uid)
        if not name:
            raise InvalidInput("name the shared-memory region to unregister; the name is empty")
        owned = self._regions.get(uid, {})
        if owned.pop(name, None) is None:
            raise InvalidInput(f"shared-memory region {name[:64]!r} is not registered")
        if not owned:
            self._regions.pop(uid, None)

    def read(
        self, uid: int | None, name: str, offset: int, byte_size: int, what: str
    ) -> memoryview:
        """A copy of bytes [offset, offset + byte_size) of a region, as uint8."""
        region = self.get(uid, name)
        start = self._bounds(region, offset, byte_size, what)
        data = np.empty(byte_size, dtype=np.uint8)
        fd = self._open(region, os.O_RDONLY, start + byte_size)
        try:
            got = os.preadv(fd, [data.data], start) if byte_size else 0
        finally:
            os.close(fd)
        if got != byte_size:
            raise InvalidInput(_shrunk(region, start + byte_size))
        return data.data

    def write(self, uid: int | None, name: str, offset: int, data: memoryview, what: str) -> None:
        """Copy ``data`` into a region at ``offset``."""
        region = self.get(uid, name)
        start = self._bounds(region, offset, data.nbytes, what)
        fd = self._open(region, os.O_WRONLY, start + data.nbytes)
        try:
            written = os.pwrite(fd, data, start) if data.nbytes else 0
        finally:
            os.close(fd)
        if written != data.nbytes:
            raise InvalidInput(_shrunk(region, start + data.nbytes))

    def clear(self) -> None:
        self._regions.clear()

    @staticmethod
    def _bounds(region: Region, offset: int, byte_size: int, what: str) -> int:
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise InvalidInput(
                f"{what} refers to bytes {offset}..{offset + byte_size} of shared-memory region"
                f" {region.name!r}, which has {region.byte_size} bytes"
            )
        return region.offset + offset

    def _open(self, region: Region, flags: int, needed: int | None = None) -> int:
        """Open the object and check it again: owner, mode and size are the caller's to change."""
        key = region.key
        path = self.root / key.lstrip("/")
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ModelNotFound(f"shared-memory object {key!r} does not exist") from None
        except OSError as error:
            raise InvalidInput(
                f"shared-memory object {key!r} cannot be opened: {error.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"shared-memory object {key!r} is not a regular object")
            if info.st_uid != region.uid:
                raise PermissionDenied(
                    f"shared-memory object {key!r} belongs to uid {info.st_uid}, not to the"
                    f" caller (uid {region.uid}); register only objects you own"
                )
            if info.st_mode & stat.S_IWOTH:
                raise InvalidInput(
                    f"shared-memory object {key!r} is writable by every user;"
                    " create it with mode 0600 or 0660"
                )
            end = region.offset + region.byte_size if needed is None else needed
            if info.st_size < end:
                raise InvalidInput(
                    f"shared-memory region {region.name!r} needs bytes"
                    f" {region.offset}..{region.offset + region.byte_size} of {key!r},"
                    f" which has {info.st_size} bytes"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd


def _require(uid: int | None) -> int:
    if uid is None:
        raise PermissionDenied(NOT_ON_UNIX)
    return uid


def _shrunk(region: Region, end: int) -> str:
    return (
        f"shared-memory object {region.key!r} became shorter than the {end} bytes"
        f" region {region.name!r} needs while it was being read or written"
    )

"""POSIX shared-memory regions registered by callers on the same device.

A caller creates an object in /dev/shm, registers (name, key, offset, size)
once, then refers to slices of it from tensors instead of sending the bytes.
The daemon maps each region once; decoding an input from it is a zero-copy
view. This mirrors Triton's system shared-memory extension.

Validation at registration: the key names one object directly in /dev/shm
(no path tricks, symlinks refused), the object is a regular file at least
offset + byte_size long, and it is not world-writable (any process on the
device could otherwise rewrite a tensor between validation and the forward
pass). Unregistering unmaps the region.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from edgeinferd.errors import InvalidInput, ModelNotFound

SHM_ROOT = Path("/dev/shm")
_KEY = re.compile(r"/?[A-Za-z0-9_.-]{1,200}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap

    def slice(self, offset: int, byte_size: int, what: str) -> memoryview:
        """The bytes [offset, offset + byte_size) of the region, bounds-checked."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise InvalidInput(
                f"{what} refers to bytes {offset}..{offset + byte_size} of shared-memory region"
                f" {self.name!r}, which has {self.byte_size} bytes"
            )
        start = self.offset + offset
        return memoryview(self.mapping)[start : start + byte_size]


class SharedMemoryRegistry:
    def __init__(self, root: Path = SHM_ROOT) -> None:
        self.root = root
        self._regions: dict[str, Region] = {}

    def regions(self) -> list[Region]:
        return [self._regions[name] for name in sorted(self._regions)]

    def get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"shared-memory region {name!r} is not registered")
        return region

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not _NAME.fullmatch(name):
            raise InvalidInput(
                f"shared-memory region name {name[:64]!r} is invalid:"
                " expected 1-128 of A-Z a-z 0-9 _ . -"
            )
        if name in self._regions:
            raise InvalidInput(f"shared-memory region {name!r} is already registered")
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(
                f"shared-memory key {key[:64]!r} is invalid:"
                " expected a POSIX name like /edgeinfer-1"
            )
        if byte_size <= 0:
            raise InvalidInput(f"shared-memory region {name!r} needs a byte_size > 0")
        path = self.root / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
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
            if info.st_mode & stat.S_IWOTH:
                raise InvalidInput(
                    f"shared-memory object {key!r} is writable by every user;"
                    " create it with mode 0600 or 0660"
                )
            if offset < 0 or offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"shared-memory region {name!r} asks for bytes {offset}..{offset + byte_size}"
                    f" of {key!r}, which has {info.st_size} bytes"
                )
            mapping = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        region = Region(name, key, offset, byte_size, mapping)
        self._regions[name] = region
        return region

    def unregister(self, name: str = "") -> None:
        """Unmap one region (or all); a region still in use by a call is unmapped after it."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is None:
                raise InvalidInput(f"shared-memory region {each!r} is not registered")
            # A call still holding a view keeps the mapping alive; it is unmapped
            # when that view is released and the region is collected.
            with contextlib.suppress(BufferError):
                region.mapping.close()

    def close(self) -> None:
        self.unregister()

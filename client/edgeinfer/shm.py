"""Client-side POSIX shared memory: put large tensors where the daemon can read them.

A region is created once (an object in /dev/shm, mode 0600 by default),
registered with the daemon, and reused: each call writes its inputs into the
region and sends only (region, offset, size). Outputs can come back the same
way. Only for a daemon on the same device.

The region is read and written with ``pread``/``pwrite`` on a descriptor kept
open, never through a mapping: any process of the same user may truncate the
object, and touching a mapped page past the new end kills the process with
SIGBUS. A short read is an error naming the region instead.

    with SharedMemoryRegion.create(64 << 20) as region:
        client.register_shared_memory(region)
        outputs = client.predict("model", {"x": big}, shared_memory=region)
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import numpy as np

from edgeinfer.tensors import NUMPY_DTYPES, dtype_code
from edgeinfer.v1 import inference_pb2, tensor_pb2

SHM_ROOT = Path("/dev/shm")
ALIGNMENT = 64


class SharedMemoryRegion:
    """A POSIX shared-memory object that this process created and will unlink."""

    def __init__(self, name: str, key: str, byte_size: int, fd: int) -> None:
        self.name = name
        self.key = key
        self.byte_size = byte_size
        #: Open for the region's life; -1 once closed.
        self._fd = fd
        #: Set by Client.register_shared_memory; a region must be registered before use.
        self.registered = False

    @classmethod
    def create(
        cls, byte_size: int, name: str | None = None, mode: int = 0o600
    ) -> SharedMemoryRegion:
        """Create a fresh object of ``byte_size`` bytes (O_EXCL: never someone else's)."""
        token = secrets.token_hex(6)
        name = name or f"edgeinfer-{os.getpid()}-{token}"
        key = f"/{name}"
        fd = os.open(SHM_ROOT / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask, nor widened
            os.ftruncate(fd, byte_size)
        except BaseException:
            os.close(fd)
            os.unlink(SHM_ROOT / name)
            raise
        return cls(name, key, byte_size, fd)

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close and unlink the object (the daemon holds neither a mapping nor a descriptor)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_ROOT / self.name)

    def write_inputs(
        self, inputs: dict[str, np.ndarray], request: inference_pb2.PredictRequest
    ) -> int:
        """Copy each array into the region and add a tensor referring to it; returns bytes used."""
        offset = 0
        for name, array in inputs.items():
            code = dtype_code(np.asarray(array).dtype)
            array = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[code])
            end = offset + array.nbytes
            if end > self.byte_size:
                raise ValueError(
                    f"inputs need more than the {self.byte_size} bytes of shared-memory region"
                    f" {self.name!r}"
                )
            self._write(array.reshape(-1).view(np.uint8).data, offset)
            tensor = request.inputs.add(name=name, dtype=code, shape=array.shape)
            tensor.shared_memory.CopyFrom(
                tensor_pb2.SharedMemoryRef(region=self.name, offset=offset, byte_size=array.nbytes)
            )
            offset = -(-end // ALIGNMENT) * ALIGNMENT
        return offset

    def read(self, tensor: tensor_pb2.Tensor) -> np.ndarray:
        """A copy of an output the daemon wrote into this region."""
        ref = tensor.shared_memory
        dtype = NUMPY_DTYPES[tensor.dtype]
        data = np.empty(ref.byte_size // dtype.itemsize, dtype=dtype)
        self._read(data.view(np.uint8).data, ref.offset)
        return data.reshape(tuple(tensor.shape))

    def _write(self, data: memoryview, offset: int) -> None:
        """pwrite all of ``data`` (writing past a truncated end grows the object, never faults)."""
        done = 0
        while done < len(data):
            done += os.pwrite(self._descriptor(), data[done:], offset + done)

    def _read(self, into: memoryview, offset: int) -> None:
        """preadv exactly ``len(into)`` bytes; fewer means the object was cut short."""
        done = 0
        while done < len(into):
            count = os.preadv(self._descriptor(), [into[done:]], offset + done)
            if count == 0:
                size = os.fstat(self._descriptor()).st_size
                raise ValueError(
                    f"shared-memory region {self.name!r} needs bytes {offset}..{offset + len(into)}"
                    f" of {self.key!r}, which has {size} bytes (truncated by another process?)"
                )
            done += count

    def _descriptor(self) -> int:
        if self._fd < 0:
            raise ValueError(f"shared-memory region {self.name!r} is closed")
        return self._fd

"""Named shared-memory segments for KV pools: create (owner), map (peer), liveness, orphan reaping.

A segment is a file in tmpfs (``/dev/shm``) named ``<prefix><worker>-<incarnation>-<n>``. The owner holds
an exclusive ``flock`` on it for as long as it lives; the kernel drops the lock when the owner exits,
even on SIGKILL. So "can I take a shared lock?" answers "is the owner gone?", which lets a reader fail a
transfer from a dead peer and lets anyone reap a dead owner's file (no leaked /dev/shm files).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import time
import warnings
from dataclasses import dataclass

import torch

_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 60.0  # a .tmp older than this was left by a creator that died before renaming it


def segment_name(prefix: str, worker_id: str, incarnation: str, index: int) -> str:
    """File name of a segment (worker ids are sanitised to ``[A-Za-z0-9_.-]``, 64 chars)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)[:64]
    return f"{prefix}{safe}-{incarnation}-{index}"


@dataclass
class Segment:
    """One mapped segment: the file, its descriptor (holding the lock), the mapping and a byte view."""

    path: str
    fd: int
    mapping: mmap.mmap
    data: torch.Tensor | None  # [nbytes] uint8 over the mapping

    @property
    def nbytes(self) -> int:
        return len(self.mapping)

    def close(self, unlink: bool) -> None:
        """Drop the view, unmap (when nobody else holds a view), close the fd; optionally unlink."""
        self.data = None
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with contextlib.suppress(BufferError):  # a pool tensor still alive elsewhere keeps it mapped
            self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create_segment(directory: str, name: str, nbytes: int) -> Segment:
    """Create, lock, allocate and prefault an ``nbytes`` segment; return it mapped read-write."""
    final_path = os.path.join(directory, name)
    tmp_path = final_path + _TMP_SUFFIX
    fd = os.open(tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process closes fd or dies
        os.posix_fallocate(fd, 0, nbytes)  # tmpfs pages allocated now, not on the first write
        os.rename(tmp_path, final_path)  # only locked files ever carry a final name
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(final_path)
        os.close(fd)
        raise
    data = torch.frombuffer(mapping, dtype=torch.uint8)
    return Segment(final_path, fd, mapping, data)


def map_segment(path: str, nbytes: int) -> Segment:
    """Map a peer's segment read-only, page tables populated. Raises FileNotFoundError if it vanished."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise ValueError(f"segment {path} has {size} bytes, its endpoint says {nbytes}")
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    with warnings.catch_warnings():  # read-only buffer: we never write through this view
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mapping, dtype=torch.uint8)
    return Segment(path, fd, mapping, data)


def is_owner_alive(fd: int) -> bool:
    """True while the segment's owner holds its exclusive lock (it lives and has not closed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def reap_orphans(directory: str, prefix: str) -> list[str]:
    """Delete segments under ``prefix`` whose owner is gone; return the deleted paths."""
    reaped: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return reaped
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(directory, name)
        try:
            if name.endswith(_TMP_SUFFIX):
                if time.time() - os.stat(path).st_mtime > _STALE_TMP_S:
                    os.unlink(path)
                    reaped.append(path)
                continue
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, PermissionError):
            continue
        try:
            if not is_owner_alive(fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                reaped.append(path)
        finally:
            os.close(fd)
    return reaped

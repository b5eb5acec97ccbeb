"""The usage recorder's spool: every queued ledger record is also appended to
a file on local disk until auth acknowledges it, so a process that is killed
(SIGKILL, out of memory, a crash) loses none of the records it had queued.
The next process to start on the same spool directory (the same process
restarted, or another replica sharing the directory) sends them.

Layout: one directory of segment files `<random>.usage`, each a run of
records framed as a 4-byte little-endian length and the record's protobuf
bytes. A process writes only to its own segments and holds an exclusive
`flock` on each while it lives; a segment nobody holds a lock on belongs to
a process that is gone, and the first recorder that locks it adopts it:
reads its records, queues them, and deletes the file once all of them are
settled (acknowledged, refused, or dropped); recorders look for such
segments when they start and every `ADOPT_SECONDS`. A recorder rotates to a new
segment every `SEGMENT_RECORDS` records and deletes a segment as soon as
every record in it is settled, so the spool holds about what is queued.

Records are written with one `write` per submission and never fsynced: they
survive the process, not the machine (the kernel's page cache is flushed by
the kernel). A torn last record (a full disk) is ignored when read back.
Record ids make a record sent twice harmless (auth stores an id once), which
is what happens to the records a killed process had sent but not yet seen
acknowledged.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError
from marie.auth.v1 import auth_service_pb2 as auth_pb

log = logging.getLogger("marie.usage")

SUFFIX = ".usage"
#: How often a running recorder looks for segments whose writer is gone (a
#: replica that died for good, on a directory the replicas share).
ADOPT_SECONDS = 30.0
#: Records per segment before the recorder starts a new one.
SEGMENT_RECORDS = 5_000
_LENGTH = struct.Struct("<I")


@dataclass(eq=False, slots=True)
class Segment:
    """One spool file and how many of its records are not settled yet."""

    path: Path
    fd: int
    written: int = 0
    unsettled: int = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)  # releases the lock


class Spool:
    """The segments of one recorder in one spool directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._current: Segment | None = None
        self._live: set[Segment] = set()

    def open(self) -> list[tuple[auth_pb.UsageRecord, Segment]]:
        """Creates the directory and adopts what stopped processes left."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.adopt()

    def adopt(self) -> list[tuple[auth_pb.UsageRecord, Segment]]:
        """The records in the segments of processes that are gone, oldest
        segment first, each with its segment (now this recorder's)."""
        adopted: list[tuple[auth_pb.UsageRecord, Segment]] = []
        paths = sorted(self.directory.glob(f"*{SUFFIX}"), key=_age)
        for path in paths:
            segment = _adopt(path)
            if segment is None:
                continue
            records = _read(segment)
            if not records:
                self._delete(segment)
                continue
            segment.unsettled = len(records)
            self._live.add(segment)
            adopted.extend((record, segment) for record in records)
        if adopted:
            log.info(
                "usage records of a stopped process found in the spool",
                extra={"records": len(adopted), "spool": str(self.directory)},
            )
        return adopted

    def append(self, records: list[auth_pb.UsageRecord]) -> Segment:
        """Writes records to the current segment (one `write`); the segment
        they were written to, to settle them with later."""
        segment = self._current
        if segment is None or segment.written >= SEGMENT_RECORDS:
            if segment is not None:
                self._seal(segment)
            segment = self._current = self._create()
        data = b"".join(_LENGTH.pack(len(b)) + b for b in map(_bytes, records))
        if os.write(segment.fd, data) != len(data):
            # A full disk: what follows a torn record could not be read back.
            self._current = None
            self._seal(segment)
            raise OSError("short write to the usage spool")
        segment.written += len(records)
        segment.unsettled += len(records)
        return segment

    def settle(self, segment: Segment, count: int = 1) -> None:
        """`count` of the segment's records are settled. Any segment but the
        current one (rotated, or adopted from a dead process) with none left
        is deleted; the current one is emptied (kept, with its lock,
        for the next records)."""
        segment.unsettled -= count
        if segment.unsettled > 0:
            return
        if segment is not self._current:
            self._delete(segment)
            return
        try:
            os.ftruncate(segment.fd, 0)
            segment.written = 0
        except OSError:  # it will be resent after a crash: harmless
            pass

    def close(self) -> None:
        """Releases every segment (their files stay for the next process)."""
        for segment in self._live:
            segment.close()
        self._live.clear()
        self._current = None

    def _create(self) -> Segment:
        # Locked before it gets the name other recorders look for.
        name = secrets.token_hex(8)
        temporary = self.directory / f".{name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = self.directory / f"{name}{SUFFIX}"
        os.rename(temporary, path)
        segment = Segment(path, fd)
        self._live.add(segment)
        return segment

    def _seal(self, segment: Segment) -> None:
        """No more records go to `segment` (the caller replaces it as the
        current one): deleted now if all its records are settled, else by
        `settle` once they are."""
        if segment.unsettled <= 0:
            self._delete(segment)

    def _delete(self, segment: Segment) -> None:
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        segment.close()
        self._live.discard(segment)


def _bytes(record: auth_pb.UsageRecord) -> bytes:
    return record.SerializeToString()


def _age(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _adopt(path: Path) -> Segment | None:
    """The segment at `path` locked by this process, or None if its writer is
    alive (it holds the lock) or another recorder took it first."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:  # adopted and settled by another recorder meanwhile
        os.close(fd)
        return None
    return Segment(path, fd)


def _read(segment: Segment) -> list[auth_pb.UsageRecord]:
    with open(segment.fd, "rb", closefd=False) as file:
        data = file.read()
    records: list[auth_pb.UsageRecord] = []
    at = 0
    while at + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, at)
        end = at + _LENGTH.size + size
        if end > len(data):
            break
        record = auth_pb.UsageRecord()
        try:
            record.ParseFromString(data[at + _LENGTH.size : end])
        except DecodeError:  # a damaged record ends what can be read
            break
        records.append(record)
        at = end
    if at != len(data):
        log.warning(
            "usage spool segment ends with a damaged record; the rest is ignored",
            extra={"segment": segment.path.name, "bytes": len(data) - at},
        )
    return records

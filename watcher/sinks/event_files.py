"""TensorBoard event files written by hand: our own files in a folder, durable when `write` returns, in step order.

Written here, not with tensorboardX (or torch.utils.tensorboard):

* `import tensorboardX` imports torch whenever torch is installed (its package `__init__` imports `writer`,
  which does `try: import torch`), and the daemon process must never import torch (no CUDA initialisation in
  the daemon; tests/test_config_devices.py checks it);
* its `SummaryWriter` writes from a background thread: `flush()` does not wait for queued events, and a write
  error (disk full) only ends that thread, after which a full queue blocks the caller. The outbox marks records
  delivered as soon as `deliver` returns, so the events must be on disk by then, and an error must raise.

The format is small and stable: TFRecord framing (length, masked CRC-32C of the length, payload, masked CRC-32C
of the payload) around `tensorboard.Event` protos, of which we need a few fields (encoded below). The tests read
the files back with TensorBoard's own loaders.

Durability: `write` writes the whole batch with one write, fsyncs the file (and the folder after creating the
file), then returns. On an OSError the file is cut back to its last written length (so a retried batch leaves
no half record or duplicate behind), the file is dropped, the error raised, and the next write starts a new
event file. `read_points` reads our files back (what the sink's `holds` compares against after a crash).

One event file per writer, kept open across writes; a new writer (a daemon restart) starts a new file in the
same folder, and TensorBoard reads all of a run's files in name order (the name starts with the creation time,
in µs).

Step order: TensorBoard's default loader, its data server (`--load_fast=auto`, TensorBoard's default, uses it
where it is installed), takes a point at step s after points at higher steps of the same tag for a restarted
training job and drops those (the Python loader keeps them). Points do come out of order (a job retried after a
later checkpoint's succeeded, jobs on several devices finishing out of order). So each batch is written in step
order, and a point below a step already written for its tag makes the writer write one new file with every
point of the folder in step order, then delete its older files (`_rewrite`; only files named `*.ckpt-watch`,
ours). That file is written whole under a name TensorBoard does not read, then renamed to `*.full.ckpt-watch`;
a crash before the older files are deleted leaves them superseded by it: never read again, and deleted by the
next writer. A TensorBoard already running replaces what it read, since the new file starts at the lowest step.
Such a rewrite costs a read and a write of all points so far (a few thousand small records at most).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from watcher.atomic import fsync_dir

FILE_TAG = ".ckpt-watch"  # ends the names of our event files: they tell ours from the trainer's
_TEMP_PREFIX = ".being-written."  # a rewrite's file until it is whole (a leftover of a crash is deleted)
FULL_TAG = ".full"  # before FILE_TAG: a rewrite's file, which holds every point of the older files
_FILE_VERSION = b"brain.Event:2"  # 2: the Python loader purges out-of-order steps only for older versions

Point = tuple[int, float, dict[str, float]]  # (step, wall time, {tag: value})


class EventFileWriter:
    """Scalar points into our event files in `log_dir` (created when first needed); see the module docstring."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # bytes of the open file known to be whole and on disk
        self._points: list[Point] | None = None  # every point in our files, in file order (loaded lazily)
        self._last: dict[str, int] = {}  # the highest step written per tag

    def write(self, batch: list[Point]) -> None:
        """Write `batch` (in step order) durably: on disk when this returns, or an OSError raised."""
        if not batch:
            return
        if self._points is None:
            _drop_superseded(self.log_dir)
            self._points = read_points(self.log_dir)
            self._last = _last_steps(self._points)
        if any(step < self._last.get(tag, step) for step, _, row in batch for tag in row):
            self._rewrite(batch)
            return
        if self._fd is None:
            self._open()
        self._append(b"".join(_record(_event(wall, step, summary=row)) for step, wall, row in batch))
        self._remember(batch)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def path(self) -> Path | None:
        """The event file being written, if one is open."""
        return self._path if self._fd is not None else None

    def _remember(self, batch: list[Point]) -> None:
        assert self._points is not None
        self._points.extend(batch)
        for step, _, row in batch:
            for tag in row:
                self._last[tag] = max(step, self._last.get(tag, step))

    def _rewrite(self, batch: list[Point]) -> None:
        """A point below a step already written: one new file with every point in step order, then the old files go.

        TensorBoard's data server reads a step below earlier ones as a restarted job and drops the later points
        of that tag; the new file starts at the lowest step, so even a TensorBoard that read the old files
        replaces what it has with the full, ordered history. Ties keep delivery order (the newest wins there).
        """
        assert self._points is not None
        points = sorted([*self._points, *batch], key=lambda point: point[0])
        old = [p for p in event_files(self.log_dir) if p.name.endswith(FILE_TAG)]
        self.close()
        # Written whole under a temporary name, then renamed: a `.full` file always holds every point, so a
        # crash before the old files are gone leaves them superseded (`_our_files`), never points lost or doubled.
        final = self._open(full=True)
        try:
            self._append(b"".join(_record(_event(wall, step, summary=row)) for step, wall, row in points))
            os.rename(self._path, final)
        except OSError:
            self._abandon()
            assert self._path is not None
            self._path.unlink(missing_ok=True)
            raise
        self._path = final
        fsync_dir(self.log_dir)
        for path in old:
            if path != self._path:
                path.unlink(missing_ok=True)
        fsync_dir(self.log_dir)
        self._points = []
        self._last = {}
        self._remember(points)

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            self._abandon()
            raise
        self._size += len(data)

    def _open(self, full: bool = False) -> Path:
        """A new event file, and its final name. `full`: it will hold every point of the folder (a rewrite,
        superseding older files) and is opened under a temporary name that TensorBoard does not read."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        while True:  # never reuse a name: names sort in creation order, which is TensorBoard's reading order
            stamp = _next_stamp()
            kind = FULL_TAG if full else ""
            final = self.log_dir / f"events.out.tfevents.{stamp:016d}.{socket.gethostname()}.{os.getpid()}{kind}{FILE_TAG}"
            path = self.log_dir / f"{_TEMP_PREFIX}{stamp:016d}{FILE_TAG}" if full else final  # no "tfevents": unread
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileExistsError:
                continue
            break
        self._fd, self._path, self._size = fd, path, 0
        self._append(_record(_event(time.time(), 0, file_version=_FILE_VERSION)))
        fsync_dir(self.log_dir)
        return final

    def _abandon(self) -> None:
        """After a failed write: cut the file back to what was delivered, close it; the next delivery starts anew."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        except OSError:
            pass  # a torn record at the very end of a file is read as "not yet written": nothing follows it
        finally:
            os.close(fd)


_last_stamp = 0


def f32(value: float) -> float:
    """`value` as a float32 simple_value stores it (how a point reads back)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _next_stamp() -> int:
    """Microseconds since the epoch, increasing within this process (file names sort in creation order)."""
    global _last_stamp
    _last_stamp = max(time.time_ns() // 1000, _last_stamp + 1)
    return _last_stamp


def _last_steps(points: list[Point]) -> dict[str, int]:
    last: dict[str, int] = {}
    for step, _, row in points:
        for tag in row:
            last[tag] = max(step, last.get(tag, step))
    return last


def _our_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(current, superseded): our event files in name (= creation) order, split at the newest rewrite's file.

    A rewrite writes its full file (whole before it gets its name) before deleting the older ones; a crash in
    between leaves both, and the older ones are then superseded: all their points are in the full file.
    """
    ours = sorted(p for p in event_files(folder) if p.name.endswith(FILE_TAG))
    fulls = [i for i, p in enumerate(ours) if p.name.endswith(FULL_TAG + FILE_TAG)]
    cut = fulls[-1] if fulls else 0
    return ours[cut:], ours[:cut]


def _drop_superseded(folder: Path) -> None:
    """Delete what a crashed rewrite left: the files it superseded, and its own file if it was not whole."""
    leftovers = list(folder.glob(f"{_TEMP_PREFIX}*{FILE_TAG}")) if folder.is_dir() else []
    for path in _our_files(folder)[1] + leftovers:
        path.unlink(missing_ok=True)


def read_points(folder: Path) -> list[Point]:
    """The points in the event files we wrote in `folder` (name order), as (step, wall time, {tag: value}).

    Reads only our own encoding (see `_event`); a torn or corrupt record ends its file's reading. Files that
    a rewrite superseded (it crashed before deleting them) are left out.
    """
    points = []
    for path in _our_files(folder)[0]:
        for payload in _records(path.read_bytes()):
            try:
                point = _parse_event(payload)
            except (IndexError, ValueError, struct.error):  # UnicodeDecodeError is a ValueError
                continue
            if point is not None and point[2]:
                points.append(point)
    return points


def event_files(folder: Path) -> list[Path]:
    """The event files in `folder` (ours and anyone's), unordered; none when it cannot be read."""
    try:
        return [p for p in folder.iterdir() if "tfevents" in p.name and p.is_file()]
    except OSError:
        return []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# --- the wire format -----------------------------------------------------------------------------------------
# tensorboard.Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary).
# tensorboard.Summary: value = 1 (repeated Value). Summary.Value: tag = 1 (string), simple_value = 2 (float), the
# scalar form torch.utils.tensorboard, tensorboardX and so the Trainer's TensorBoardCallback write.


def _event(wall_time: float, step: int, file_version: bytes | None = None,
           summary: dict[str, float] | None = None) -> bytes:  # fmt: skip
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version)
    if summary is not None:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in summary.items())  # fmt: skip
        out += _field(5, values)
    return out


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64: a negative number is ten bytes of two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _records(data: bytes):
    offset = 0
    while offset + 12 <= len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        end = offset + 12 + length + 4
        if end > len(data) or struct.unpack("<I", data[offset + 8 : offset + 12])[0] != _masked_crc(header):
            return
        payload = data[offset + 12 : end - 4]
        if struct.unpack("<I", data[end - 4 : end])[0] != _masked_crc(payload):
            return
        yield payload
        offset = end


def _parse_event(payload: bytes) -> Point | None:
    wall, step, row = 0.0, 0, {}
    for number, value in _fields(payload):
        if number == 1:
            (wall,) = struct.unpack("<d", value)
        elif number == 2:
            step = value - (1 << 64) if value >= 1 << 63 else value
        elif number == 5:
            for number_v, entry in _fields(value):
                tag, simple = None, None
                for number_e, item in _fields(entry) if number_v == 1 else ():
                    if number_e == 1:
                        tag = item.decode()
                    elif number_e == 2:
                        (simple,) = struct.unpack("<f", item)
                if tag is not None and simple is not None:
                    row[tag] = simple
    return step, wall, row


def _fields(data: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for the rest."""
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _read_varint(data, offset)
        elif wire == 1:
            value, offset = data[offset : offset + 8], offset + 8
        elif wire == 2:
            length, offset = _read_varint(data, offset)
            value, offset = data[offset : offset + length], offset + length
        elif wire == 5:
            value, offset = data[offset : offset + 4], offset + 4
        else:
            return
        yield number, value


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def _record(payload: bytes) -> bytes:
    """TFRecord framing: length, masked CRC of the length, payload, masked CRC of the payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # CRC-32C (Castagnoli), reflected
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

"""The access log's write-behind (manager/writebehind.py) on real files: a file on the root
disk keeps only a few windows in the page cache (measured with util-linux's fincore, i.e.
mincore(2)), every line still reaches the file in order, reopen restarts the windows on
the new file, 0 turns it off, and pipes and character devices are left alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from forkproxy.config import LogConfig, parse_size
from forkproxy.manager.accesslog import WRITE_BEHIND, AccessLog

MiB = 1 << 20
WINDOW = 2 * MiB
PAD = b"x" * 180


@pytest.fixture
def disk_dir():
    """A directory on the root disk's file system (tmp_path may be tmpfs elsewhere)."""
    path = tempfile.mkdtemp(prefix="fp-writebehind-", dir="/var/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def resident(path: str) -> int:
    """Bytes of the file in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def numbered(first: int, count: int) -> list[bytes]:
    return [b'{"n":%d,"pad":"%s"}\n' % (i, PAD) for i in range(first, first + count)]


def write_all(log: AccessLog, lines: list[bytes], per_batch: int = 97) -> None:
    """As the collector hands them over: batches of lines into the buffer."""
    for i in range(0, len(lines), per_batch):
        chunk = lines[i:i + per_batch]
        log.write_lines(b"".join(chunk), len(chunk))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_default_is_on_and_config_zero_turns_it_off():
    assert LogConfig().access_log_write_behind == WRITE_BEHIND == 16 * MiB
    assert parse_size("0") == 0 and parse_size("32m") == 32 * MiB


def test_a_disk_file_keeps_a_few_windows_in_the_page_cache(disk_dir):
    lines = numbered(0, 48 * MiB // len(numbered(0, 1)[0]))
    size = len(b"".join(lines))
    bounded = os.path.join(disk_dir, "bounded.log")
    log = AccessLog(bounded, "json", write_behind=WINDOW)
    assert log.behind.enabled
    write_all(log, lines)
    log.close()
    plain = os.path.join(disk_dir, "plain.log")
    log = AccessLog(plain, "json", write_behind=0)
    assert not log.behind.enabled
    write_all(log, lines)
    log.close()
    # without write-behind the kernel keeps the whole file; with it, a few windows
    # (measured before reading the files back, which caches them again)
    assert resident(plain) >= size - WINDOW
    assert resident(bounded) <= 6 * WINDOW, (resident(bounded), size)
    assert read(bounded) == read(plain) == b"".join(lines)  # every line, in order


def test_reopen_starts_windows_on_the_new_file(disk_dir):
    path = os.path.join(disk_dir, "access.log")
    log = AccessLog(path, "json", write_behind=WINDOW)
    first, second = numbered(0, 60_000), numbered(60_000, 60_000)
    write_all(log, first)
    os.rename(path, path + ".1")  # logrotate
    log.write_lines(second[0], 1)  # buffered: still the old file's
    log.reopen()
    assert log.behind.enabled and log.behind.marks == [0]  # offsets of the new file
    write_all(log, second[1:])
    log.close()
    for p in (path, path + ".1"):  # before reading them back
        assert resident(p) <= 6 * WINDOW, (p, resident(p), os.path.getsize(p))
    assert read(path + ".1") == b"".join(first) + second[0]
    assert read(path) == b"".join(second[1:])
    # appending to a file that has lines already: windows start at its end
    log = AccessLog(path, "json", write_behind=WINDOW)
    assert log.behind.marks == [os.path.getsize(path)]
    log.close()


def test_copytruncate_restarts_the_windows(disk_dir):
    """logrotate's copytruncate: the file shrinks to 0 under the writer, which goes on
    appending; without the restart no window would be handled until the file grew past
    its old size."""
    path = os.path.join(disk_dir, "access.log")
    log = AccessLog(path, "json", write_behind=WINDOW)
    write_all(log, numbered(0, 60_000))  # ~12 MiB
    log.flush()
    os.truncate(path, 0)
    lines = numbered(60_000, 120_000)  # ~24 MiB: the first 12 would stay cached
    write_all(log, lines)
    log.close()
    assert resident(path) <= 5 * WINDOW, (resident(path), os.path.getsize(path))
    assert read(path) == b"".join(lines)


def test_reconfigure_changes_the_window_and_the_file(disk_dir):
    a, b = os.path.join(disk_dir, "a.log"), os.path.join(disk_dir, "b.log")
    log = AccessLog(a, "json", write_behind=0)
    write_all(log, numbered(0, 1000))
    log.reconfigure(a, "json", WINDOW)  # same file, window turned on at its end
    assert log.behind.enabled and log.behind.marks == [os.path.getsize(a)]
    log.reconfigure(b, "json", 0)  # a new file without it
    assert log.path == b and not log.behind.enabled
    write_all(log, numbered(1000, 1000))
    log.close()
    assert read(a) == b"".join(numbered(0, 1000))
    assert read(b) == b"".join(numbered(1000, 1000))


def test_tmpfs_lines_all_arrive(tmp_path):
    """On tmpfs nothing can be dropped (the pages are the file); writes go on as before."""
    scratch = tempfile.mkdtemp(prefix="fp-writebehind-", dir="/dev/shm")
    try:
        path = os.path.join(scratch, "access.log")
        log = AccessLog(path, "json", write_behind=WINDOW)
        lines = numbered(0, 40_000)
        write_all(log, lines)
        assert log.behind.enabled and log.behind.calls >= 3
        log.close()
        assert read(path) == b"".join(lines)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_pipes_and_devices_are_left_alone(tmp_path):
    fifo = str(tmp_path / "log.fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        log = AccessLog(fifo, "json", write_behind=1024)
        assert not log.behind.enabled
        lines = numbered(0, 100)  # under the pipe's 64 KiB
        write_all(log, lines, per_batch=10)
        log.close()
        assert os.read(reader, 1 << 20) == b"".join(lines)
    finally:
        os.close(reader)
    for path in ("/dev/null", "-"):
        log = AccessLog(path, "json", write_behind=1024)
        assert not log.behind.enabled
        log.close()

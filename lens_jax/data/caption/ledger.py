"""The durable ledger of a captioning job; its files are also the job's output.

    OUT/captions.jsonl   one line per accepted image (the done ledger), appended as each is accepted
    OUT/failed.jsonl     one line per failure (the failed ledger); the last line of a key wins
    OUT/.lock            held (flock) while a job writes to OUT: two jobs never share a directory

Why append-only JSONL and not sqlite: the captions file *is* the ledger, so there is no second copy
that a crash could leave behind or ahead of it (a sqlite ledger would need an export step, and a kill
between the commit and the export is exactly the loss/duplication to avoid). Each record is one
``os.write`` of a complete line to a file opened with O_APPEND, so after the call returns the record
survives the process being killed (SIGKILL included); ``os.fsync`` then makes it survive a power loss
as well (done after releasing the lock, so concurrent workers' fsyncs overlap). The one thing a kill
can leave is a torn last line (a write cut short); opening the ledger truncates it, so the image it
described is simply captioned again. A key is appended to captions.jsonl at most once: the check and
the append happen under one lock, and restarts skip keys already there. Duplicates or unreadable
lines that could only come from outside editing are dropped by rewriting the file atomically (temp
file, fsync, rename). The readers' rule is simple: every complete line of captions.jsonl is one
accepted caption, keys are unique.

failed.jsonl is compacted (atomically) when the ledger opens and closes: the latest failure per key,
none for keys that were captioned since. A failure is ``retryable`` when it came from the transport
(timeouts, 429/5xx, connection errors after all attempts): the next run tries those items again.
Image and answer failures (unreadable image, refusal, invalid answer) are permanent unless the job
is run with ``retry_failed``.

Usage (``prompt_tokens``, ``completion_tokens``, ``cost_usd``, ``attempts``) in a record covers every
request made for that image, across runs: a record that follows a failure of the same key adds the
failure's usage. So the latest record per key holds all its spending, compaction loses none, and the
sum over both files is what the output directory has cost (the ``--max-cost`` budget starts from it;
only the requests of images left unfinished by a killed or stopped run are not counted).

Memory: the keys of done items (a set of strings) and the failed records are kept in memory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.jsonl"
FAILED_FILE = "failed.jsonl"
LOCK_FILE = ".lock"


USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "cost_usd", "attempts")


def _add(total: dict, rec: Mapping[str, Any]) -> None:
    for k in USAGE_FIELDS:
        total[k] += rec.get(k) or 0
    cost, attempts = rec.get("cost_usd") or 0, rec.get("attempts") or 0
    if cost > 0 and attempts > 0:  # the largest mean cost of one request: the budget's first estimate
        total["max_request_cost_usd"] = max(total.get("max_request_cost_usd", 0.0), cost / attempts)


def _carry(record: Mapping[str, Any], earlier: Mapping[str, Any] | None) -> dict:
    """``record`` with the usage of the key's earlier failure added: a record's usage covers every
    attempt ever made for its image, so keeping only the latest record per key loses no spending."""
    record = dict(record)
    if earlier:
        for k in USAGE_FIELDS:
            if k in record or k in earlier:
                v = (record.get(k) or 0) + (earlier.get(k) or 0)
                record[k] = round(v, 9) if isinstance(v, float) else v
    return record


class LedgerBusy(RuntimeError):
    """Another process holds the output directory's lock."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data``: a reader (or a crash) sees the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _encode(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")


def read_jsonl(path: Path, *, repair: bool = False) -> tuple[list[dict], bool]:
    """(records, clean) from a JSONL ledger. A torn last line (no newline) is dropped, and with
    ``repair`` truncated from the file; ``clean`` is False when other bad lines were skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], True
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        data = data[:end]
    records, clean = [], True
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            log.warning("%s:%d: skipping an unreadable ledger line", path, lineno)
            clean = False
            continue
        records.append(rec)
    return records, clean


class Ledger:
    """Open with ``Ledger(out_dir)`` (takes the directory's lock); :meth:`close` when done."""

    def __init__(self, out_dir: str | os.PathLike, *, fsync: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = bool(fsync)
        self._lock = threading.Lock()
        self._lock_file = open(self.dir / LOCK_FILE, "a+")
        try:
            import fcntl

            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no protection against two jobs on one directory
            pass
        except OSError as exc:
            self._lock_file.close()
            raise LedgerBusy(f"{self.dir}: another captioning job is writing here") from exc
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening and compaction

    def _load(self) -> None:
        for stale in self.dir.glob(".*.tmp-*"):  # an atomic rewrite cut short by a kill
            stale.unlink(missing_ok=True)
        self.captions_path = self.dir / CAPTIONS_FILE
        self.failed_path = self.dir / FAILED_FILE
        done_records, clean = read_jsonl(self.captions_path, repair=True)
        self.done: set[str] = set()
        self._done_usage: dict[str, Any] = {**dict.fromkeys(USAGE_FIELDS, 0), "max_request_cost_usd": 0.0}
        unique = []
        for rec in done_records:
            if rec["key"] in self.done:
                clean = False
                continue
            self.done.add(rec["key"])
            unique.append(rec)
            _add(self._done_usage, rec)
        if not clean:
            log.warning("%s: rewriting without duplicate or unreadable lines", self.captions_path)
            write_atomic(self.captions_path, b"".join(_encode(r) for r in unique))
        del done_records, unique
        failed_records, clean = read_jsonl(self.failed_path, repair=True)
        self.failed: dict[str, dict] = {}
        for rec in failed_records:  # the last line of a key wins
            if rec["key"] not in self.done:
                self.failed.pop(rec["key"], None)
                self.failed[rec["key"]] = rec
        if not clean or len(failed_records) != len(self.failed):
            self._compact_failed()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        self._done_fd = os.open(self.captions_path, flags, 0o644)
        self._failed_fd = os.open(self.failed_path, flags, 0o644)

    def _compact_failed(self) -> None:
        write_atomic(self.failed_path, b"".join(_encode(r) for r in self.failed.values()))

    def spent(self) -> dict[str, float]:
        """prompt_tokens, completion_tokens, cost_usd, attempts recorded so far (all runs), and
        max_request_cost_usd: the largest cost per request of a record (0.0 when none is known)."""
        with self._lock:
            total = dict(self._done_usage)
            for rec in self.failed.values():
                _add(total, rec)
            return total

    # ------------------------------------------------------------------ queries

    def is_done(self, key: str) -> bool:
        return key in self.done

    def failure(self, key: str) -> dict | None:
        return self.failed.get(key)

    def failed_records(self) -> list[dict]:
        with self._lock:
            return list(self.failed.values())

    # ------------------------------------------------------------------ appending

    def _append(self, fd: int, line: bytes) -> None:
        view = memoryview(line)
        while view:  # a regular file takes the whole line in one write; loop only for safety
            n = os.write(fd, view)
            view = view[n:]

    def _sync(self, fd: int) -> None:
        if self.fsync:
            try:
                os.fsync(fd)
            except OSError:  # closed meanwhile by close(), which fsyncs itself
                pass

    def record_done(self, record: Mapping[str, Any]) -> bool:
        """Appends an accepted caption; False (nothing written) when the key is already done."""
        key = record["key"]
        with self._lock:
            if key in self.done:
                return False
            if self._done_fd is None:
                raise RuntimeError("the ledger is closed")
            record = _carry(record, self.failed.get(key))
            fd = self._done_fd
            self._append(fd, _encode(record))
            self.done.add(key)
            self.failed.pop(key, None)
            _add(self._done_usage, record)
        self._sync(fd)
        return True

    def record_failed(self, record: Mapping[str, Any]) -> bool:
        """Appends a failure; False when the key is already done."""
        key = record["key"]
        with self._lock:
            if key in self.done:
                return False
            if self._failed_fd is None:
                raise RuntimeError("the ledger is closed")
            record = _carry(record, self.failed.get(key))
            fd = self._failed_fd
            self._append(fd, _encode(record))
            self.failed.pop(key, None)
            self.failed[key] = record
        self._sync(fd)
        return True

    def close(self) -> None:
        """Compacts failed.jsonl and releases the directory."""
        with self._lock:  # appends hold this lock too: none can hit a closed (or reused) descriptor
            for name in ("_done_fd", "_failed_fd"):
                fd = getattr(self, name, None)
                if fd is not None:
                    try:
                        os.fsync(fd)
                    except OSError:
                        pass
                    os.close(fd)
                    setattr(self, name, None)
            if hasattr(self, "failed"):
                self._compact_failed()
        if not self._lock_file.closed:
            self._lock_file.close()  # releases the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_captions(out_dir: str | os.PathLike) -> list[dict]:
    """The accepted captions of ``out_dir`` (read-only; a torn last line is ignored)."""
    return read_jsonl(Path(out_dir) / CAPTIONS_FILE)[0]


def load_failures(out_dir: str | os.PathLike) -> list[dict]:
    """The latest failure per key of ``out_dir`` that has no accepted caption."""
    done = {r["key"] for r in load_captions(out_dir)}
    latest: dict[str, dict] = {}
    for rec in read_jsonl(Path(out_dir) / FAILED_FILE)[0]:
        if rec["key"] not in done:
            latest[rec["key"]] = rec
    return list(latest.values())

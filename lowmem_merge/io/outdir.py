"""The output directory's life: refuse to clobber, resume from a manifest, finish atomically.

The manifest (``lowmerge-manifest.json``) records what must not change between a run and its resumption (the
fingerprint) and each finished shard's sha256. Final names appear only in ``finish``: shards are renamed, then the
index is written, then the manifest is removed. A run holds an exclusive lock on the directory (``LOCK_NAME``,
flock) from start to end, so two runs never write into one directory.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ..errors import OutputError
from .writer import MANIFEST_NAME, PARTIAL, Shard, output_error, sha256_file, write_index, write_json_atomic

REPORT_NAME = "lowmerge_report.json"
LOCK_NAME = ".lowmerge.lock"


class OutputDir:
    """A context manager: leaving it releases the directory's lock (``finish`` does too)."""

    def __init__(self, path: str | Path, fingerprint: dict, *, resume: bool = False, force: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.manifest: dict = {"fingerprint": fingerprint, "shards": {}, "files": []}
        self._previous: set[str] = set()           # --force: what a previous lowmerge run wrote here
        self._lock: int | None = None
        try:
            self._prepare(resume, force)
        except OSError as e:
            self.release()
            raise output_error(e, self.path) from None
        except BaseException:
            self.release()
            raise

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- start --------------------------------------------------------------------------------------------------
    def _prepare(self, resume: bool, force: bool) -> None:
        p = self.path
        _refuse_if_locked(p)                       # a run writing here now: say so, whatever its files look like
        self._check_start(resume, force)           # read-only: a refused directory gets no lock file
        p.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(p)
        self._check_start(resume, force)           # again, now that no other run can change it
        if resume and _is_record(p / MANIFEST_NAME):
            self._load_manifest(p / MANIFEST_NAME)
            return
        if force and _entries(p):
            self._previous = self._previous_output()
        self.save_manifest()

    def _check_start(self, resume: bool, force: bool) -> None:
        """Refuse a directory this run may not write into: a file, someone else's files, a finished merge."""
        p = self.path
        if (p.exists() or p.is_symlink()) and not p.is_dir():
            raise OutputError("exists and is not a directory", path=p, hint="choose another -o")
        entries = _entries(p) if p.is_dir() else []
        manifest, report = _is_record(p / MANIFEST_NAME), _is_record(p / REPORT_NAME)
        if resume and not manifest and report:
            raise OutputError("this merge is already complete: nothing to resume", path=p,
                              hint="use --force to merge again into it")
        if entries and not (resume or force):
            raise OutputError("output directory exists and is not empty", path=p,
                              hint="use --resume to continue an interrupted merge, --force to replace a previous "
                                   "lowmerge output, or choose another -o")
        if entries and not (manifest or report):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(f"not empty and holds no lowmerge output (found {shown})", path=p,
                              hint="--resume and --force only reuse a directory a lowmerge run wrote "
                                   "(with its lowmerge-manifest.json or lowmerge_report.json): choose another -o")

    def _load_manifest(self, manifest_path: Path) -> None:
        old = _read_record(manifest_path)
        if old is None or not isinstance(old.get("fingerprint"), dict) or not isinstance(old.get("shards"), dict):
            raise OutputError("the resume manifest is unreadable", path=manifest_path,
                              hint="use --force to start the merge again")
        changed = _changes(old["fingerprint"], self.fingerprint)
        if changed:
            raise OutputError(f"cannot resume: changed since the interrupted run: {'; '.join(changed)}",
                              path=self.path,
                              hint="rerun with the same inputs and options, or use --force to start again")
        self.manifest["files"] = _names(old.get("files"))
        for name, rec in old["shards"].items():
            if _safe_name(name) and isinstance(rec, dict) and self._shard_intact(name, rec):
                self.manifest["shards"][name] = rec
        self.save_manifest()

    def _shard_intact(self, name: str, rec: dict) -> bool:
        """A regular file (never a link: a link planted here could point anywhere) of the recorded size and hash."""
        part = self.path / (name + PARTIAL)
        st = part.lstat() if part.exists() or part.is_symlink() else None
        return (st is not None and stat.S_ISREG(st.st_mode) and st.st_size == rec.get("size")
                and sha256_file(part) == rec.get("sha256"))

    def _previous_output(self) -> set[str]:
        """--force: the files a previous lowmerge run wrote here (its manifest or report lists them)."""
        ours: set[str] = set()
        for record in (self.path / MANIFEST_NAME, self.path / REPORT_NAME):
            data = _read_record(record) if _is_record(record) else None
            if data is None:
                continue
            files = _names(data.get("files"))
            shards = _names(list(data["shards"]) if isinstance(data.get("shards"), dict) else [])
            ours.update(files + [n + PARTIAL for n in files] + [s + PARTIAL for s in shards])
            ours.add(record.name)
        return ours - {MANIFEST_NAME}                # this run's manifest is already in place

    def _remove_previous_output(self) -> None:
        """Delete only what a previous run wrote, and only inside the output directory."""
        root = self.path.resolve()
        for name in sorted(self._previous):
            target = self.path / name
            if target.is_file() and root in target.resolve().parents:
                target.unlink()
        heads = self.path / "heads"
        if heads.is_dir() and not heads.is_symlink() and not any(heads.iterdir()):
            heads.rmdir()
        self._previous = set()

    # -- during --------------------------------------------------------------------------------------------------
    @property
    def done_shards(self) -> dict[str, dict]:
        return self.manifest["shards"]

    def record_shard(self, name: str, record: dict) -> None:
        self.manifest["shards"][name] = record
        self.save_manifest()

    def save_manifest(self) -> None:
        try:
            write_json_atomic(self.path / MANIFEST_NAME, self.manifest)
        except OSError as e:
            raise output_error(e, self.path / MANIFEST_NAME) from None

    def claim(self, names: list[str]) -> None:
        """Refuse to overwrite a file lowmerge did not write; only then remove a previous output (--force).

        ``names`` (relative to the directory) are recorded as this run's, so --force and --resume know them.
        """
        ours = set(self.manifest["files"]) | self._previous
        for name in names:
            if "/" in name and (self.path / name).parent.is_symlink():
                raise OutputError(f"{str(PurePosixPath(name).parent)!r} is a symbolic link", path=self.path,
                                  hint="remove it: lowmerge writes only inside the output directory")
            if ((self.path / name).exists() or (self.path / name).is_symlink()) and name not in ours:
                raise OutputError(f"would overwrite {name!r}, which lowmerge did not write", path=self.path,
                                  hint="move that file away or choose another -o")
        try:
            self._remove_previous_output()
        except OSError as e:
            raise output_error(e, self.path) from None
        self.add_files(names)

    # -- end -----------------------------------------------------------------------------------------------------
    def finish(self, shards: list[Shard]) -> None:
        """Rename shards to their final names, write the index last, drop the manifest."""
        for shard in shards:
            os.replace(self.path / shard.partial, self.path / shard.name)
        if len(shards) > 1:
            write_index(self.path, shards)
        (self.path / MANIFEST_NAME).unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Give up the lock (removing its file first, while still holding it)."""
        if self._lock is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    def add_files(self, names: list[str]) -> None:
        for n in names:
            if n not in self.manifest["files"]:
                self.manifest["files"].append(n)
        self.save_manifest()


def _changes(old: object, new: object, where: str = "") -> list[str]:
    """What differs between two fingerprints, as readable paths: ``experts[1] /x/model.safetensors mtime_ns``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new), key=str)
                for c in _changes(old.get(k), new.get(k), f"{where} {k}".strip())]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in _changes(a, b, f"{where}[{i}]")]
    return [where] if old != new else []


def _entries(p: Path) -> list[str]:
    """The directory's names, without the lock file (a run that stopped at once may leave only that)."""
    return sorted(x.name for x in p.iterdir() if x.name != LOCK_NAME)


def _is_record(p: Path) -> bool:
    """A manifest or report counts only as a regular file: a symlink planted at its name is no lowmerge output."""
    return p.is_file() and not p.is_symlink()


def _read_record(p: Path) -> dict | None:
    try:
        data = json.loads(p.read_text())
    except (ValueError, OSError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _safe_name(name: object) -> bool:
    """A name a record may list: relative, inside the directory (no ``..``), as lowmerge writes them."""
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def _names(value: object) -> list[str]:
    return [n for n in value if _safe_name(n)] if isinstance(value, list) else []


def _lock(p: Path) -> int:
    """An exclusive flock on ``p/LOCK_NAME`` (holding this run's pid), or an OutputError naming the holder."""
    path = p / LOCK_NAME
    for _ in range(3):       # the holder removes the file as it finishes: lock the file that is there now
        # O_NONBLOCK: a FIFO planted at the name must not hang the open; O_NOFOLLOW: nor may a link redirect it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(f"{LOCK_NAME} is not a regular file", path=p, hint=f"remove {path}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _held(p, fd) from None
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OutputError("cannot lock the output directory: its lock file keeps changing", path=p,
                      hint="another lowmerge run is starting or finishing there: try again")


def _refuse_if_locked(p: Path) -> None:
    """Read-only probe: if another run holds ``p``'s lock, refuse now (the files it is writing, e.g. a manifest
    between its ``.partial`` and the rename, must not be judged as someone else's). Creates nothing."""
    try:
        fd = os.open(p / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:                                # no lock file (or none we may open): nobody holds it
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return                                 # _lock() reports a planted non-file
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(p, fd) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _held(p: Path, fd: int) -> OutputError:
    """The refusal when another run holds ``p``'s lock (``fd``: its lock file, holding that run's pid)."""
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return OutputError(f"another lowmerge run is writing {p}" + (f" (pid {pid})" if pid.isdigit() else ""), path=p,
                       hint="wait for it to finish, or choose another -o")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def check_apart(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, contains or lies inside an input, compared through resolved symlinks: a merge
    would write among the files it reads, and --force would delete an earlier merge that is now an input."""
    o = Path(out).resolve()
    for given in inputs:
        i = Path(given).resolve()
        where = "is" if o == i else "lies inside" if i in o.parents else "contains" if o in i.parents else None
        if where:
            raise OutputError(f"the output directory {where} the input {given}", path=out,
                              hint="choose an -o outside every input (base, experts, calibration files, "
                                   "tokenizer source)")

"""--resume after a merge that died: real subprocesses, killed with SIGKILL or stopped by a file-size limit.

A resumed merge keeps the shards its manifest records as complete (checked by sha256), writes the rest, and gives
the bytes an uninterrupted run gives; it refuses, naming what changed, when the inputs or the options changed.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY, finish, start_merge

from lowmem_merge.demo import LlamaShape, build_example

MANIFEST = "lowmerge-manifest.json"
ARGS = ["-q", "-m", "task_arithmetic"]
BIG = LlamaShape(hidden=256, intermediate=688, layers=6, vocab=4096)   # 13 MB a model: a merge of ~0.5 s
BIG_SHARD = "1MB"                                                     # 14 output shards
TINY_SHARD = "10KB"                                                   # 5 output shards


def cli(root: Path, out: str, *extra: str, limit: int | None = None) -> subprocess.Popen:
    return start_merge(root, out, *ARGS, *extra, limit=limit)


def shard_bytes(out: Path) -> dict[str, bytes]:
    """The merged weights: every shard and the index (the report and card differ in timings and dates)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith(".safetensors") or p.name.endswith(".index.json")}


def recorded(out: Path) -> dict[str, dict]:
    """Shards the manifest records as complete ({} before the manifest exists)."""
    try:
        return json.loads((out / MANIFEST).read_text())["shards"]
    except FileNotFoundError:
        return {}


def looks_complete(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name in ("model.safetensors", "model.safetensors.index.json",
                                                               "lowmerge_report.json")
                  or (p.name.startswith("model-") and p.name.endswith(".safetensors")))


def resumed(out: Path) -> list[str]:
    return json.loads((out / "lowmerge_report.json").read_text())["output"]["resumed_shards"]


# -- killed with SIGKILL, then resumed -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A Llama-shaped example large enough to kill mid-merge, and its uninterrupted merge's shards."""
    root = tmp_path_factory.mktemp("big")
    build_example(root / "in", BIG, n_experts=3)
    proc = finish(cli(root, "ref", "--shard-size", BIG_SHARD))
    assert proc.returncode == 0, proc.stderr
    ref = shard_bytes(root / "ref")
    assert len(ref) == 15       # 14 shards and the index
    return root, ref


def kill_when(root: Path, out: str, ready: Callable[[Path], bool], want: Callable[[dict], bool],
              attempts: int = 5) -> dict[str, dict]:
    """Run the merge and SIGKILL it once ``ready(out)``; returns the manifest's shards at that moment.

    The process is stopped (SIGSTOP) the moment ``ready`` holds, so what is on disk cannot move while the test
    reads it; a run that raced past the intended point (``want`` fails on what it recorded) is tried again.
    """
    for _ in range(attempts):
        shutil.rmtree(root / out, ignore_errors=True)
        proc = cli(root, out, "--shard-size", BIG_SHARD)
        deadline = time.monotonic() + 120
        state = None
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(root / out):
                os.kill(proc.pid, signal.SIGSTOP)
                state = recorded(root / out) if (root / out / MANIFEST).is_file() else None
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
        finish(proc)
        if state is not None and want(state):
            assert proc.returncode == -signal.SIGKILL
            return state
    pytest.fail(f"the merge never stopped at the intended point in {attempts} attempts")


def partial_shards(out: Path) -> list[Path]:
    return list(out.glob("model-*.safetensors.partial")) if out.is_dir() else []


KILL_POINTS = {
    # a shard is being written and none is complete
    "first-shard": (lambda out: bool(partial_shards(out)) and not recorded(out), lambda s: not s),
    # as soon as one shard is complete
    "one-shard": (lambda out: len(recorded(out)) >= 1, lambda s: 1 <= len(s) < 14),
    # half the shards are complete
    "half": (lambda out: len(recorded(out)) >= 7, lambda s: 7 <= len(s) < 14),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_gives_the_same_bytes(big, point):
    root, ref = big
    out = root / f"out-{point}"
    state = kill_when(root, out.name, *KILL_POINTS[point])
    assert looks_complete(out) == []
    if point == "first-shard":
        assert partial_shards(out)         # a half-written shard, which must be written again
    kept = {name: (out / (name + ".partial")).stat().st_mtime_ns for name in state}

    proc = finish(cli(root, out.name, "--shard-size", BIG_SHARD, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(out) == ref
    assert resumed(out) == sorted(state)
    assert {name: (out / name).stat().st_mtime_ns for name in state} == kept     # kept, not written again
    assert not (out / MANIFEST).exists() and not partial_shards(out)


# -- stopped by a file-size limit; inputs or options changed before --resume -----------------------------------------

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, dict[str, bytes], list[str]]:
    """``root/out``: a tiny merge stopped by EFBIG after some shards; ``root/ref``: the same merge uninterrupted.

    Returns root, the reference shards, and the shards the interrupted run recorded as complete.
    """
    root = tmp_path_factory.mktemp("interrupted")
    build_example(root / "in", TINY, n_experts=3)
    proc = finish(cli(root, "ref", "--shard-size", TINY_SHARD))
    assert proc.returncode == 0, proc.stderr
    ref = shard_bytes(root / "ref")
    names = sorted(ref)[:-1]                         # the shards, without the index
    sizes = [len(ref[n]) for n in names]
    stop = next(i for i in range(1, len(sizes)) if sizes[i] > max(sizes[:i]))  # first shard larger than all before
    proc = finish(cli(root, "out", "--shard-size", TINY_SHARD, limit=sizes[stop] - 1))
    assert proc.returncode == 1 and "file size limit" in proc.stderr, proc.stderr
    assert sorted(recorded(root / "out")) == names[:stop]
    return root, ref, names[:stop]


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _grow(path: Path) -> None:
    """Eight more bytes at the end, mtime kept: only the size differs."""
    st = path.stat()
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _rewrite_header(path: Path) -> None:
    """Same size, same mtime, same tensors: only the header's bytes differ."""
    st = path.stat()
    data = path.read_bytes()
    assert data.count(b'"format":"pt"') == 1
    path.write_bytes(data.replace(b'"format":"pt"', b'"format":"PT"'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_last_byte(path: Path) -> None:
    """Same size, same mtime, same header: only a weight's byte differs."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


REFUSALS = {   # case -> (change to the inputs, options of the resumed run, what the error must name)
    "mtime": (lambda r: _touch(r / "in/expert1/model.safetensors"), [],
              ["experts[1] in/expert1/model.safetensors mtime_ns"]),
    "size": (lambda r: _grow(r / "in/expert0/model.safetensors"), [],
             ["experts[0] in/expert0/model.safetensors size"]),
    "header": (lambda r: _rewrite_header(r / "in/base/model.safetensors"), [],
               ["base in/base/model.safetensors header_sha256"]),
    "content": (lambda r: _flip_last_byte(r / "in/expert2/model.safetensors"), [],
                ["experts[2] in/expert2/model.safetensors sample_sha256"]),
    "method": (None, ["-m", "average"], ["method"]),
    "params": (None, ["-p", "scale=0.5"], ["params scale"]),
    "dtype": (None, ["--dtype", "float32"], ["dtype"]),
}


@pytest.fixture(scope="module")
def refusals(interrupted, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every REFUSALS case resumed in its own copy of ``interrupted`` (copies keep mtimes), all at once."""
    root = interrupted[0]
    started = {}
    for case, (change, extra, _) in REFUSALS.items():
        copy = tmp_path_factory.mktemp("refuse") / case
        shutil.copytree(root, copy)
        if change:
            change(copy)
        started[case] = (cli(copy, "out", "--shard-size", TINY_SHARD, "--resume", *extra), copy)
    return {case: (finish(proc), copy) for case, (proc, copy) in started.items()}


@pytest.mark.parametrize("case", REFUSALS)
def test_resume_refuses_when_inputs_or_options_changed(refusals, case):
    proc, copy = refusals[case]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error, hint = proc.stderr.splitlines()
    assert error.startswith("error: out: cannot resume: changed since the interrupted run: ")
    for needle in REFUSALS[case][2]:
        assert needle in error, error
    assert "size" not in error.replace("sample_sha256", "") or case == "size"     # only what changed is named
    assert "mtime_ns" not in error or case == "mtime"
    assert hint.startswith("hint: ")
    assert looks_complete(copy / "out") == []
    assert recorded(copy / "out")                       # the finished shards are still there for a proper resume


def test_resume_keeps_recorded_shards_and_writes_the_rest(interrupted, tmp_path):
    root, ref, done = interrupted
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    kept = {name: (copy / "out" / (name + ".partial")).stat().st_mtime_ns for name in done}
    proc = finish(cli(copy, "out", "--shard-size", TINY_SHARD, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(copy / "out") == ref
    assert resumed(copy / "out") == done
    assert {name: (copy / "out" / name).stat().st_mtime_ns for name in done} == kept


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_a_corrupted_partial_shard_is_written_again(interrupted, tmp_path, damage):
    root, ref, done = interrupted
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = copy / "out" / (done[0] + ".partial")
    data = bytearray(victim.read_bytes())
    if damage == "flipped-byte":
        data[-3] ^= 0xFF                                # same size: only the sha256 can tell
    else:
        del data[-100:]
    victim.write_bytes(bytes(data))
    proc = finish(cli(copy, "out", "--shard-size", TINY_SHARD, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(copy / "out") == ref
    assert resumed(copy / "out") == done[1:]


def test_resume_of_a_complete_merge_is_refused(interrupted, tmp_path):
    root = interrupted[0]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    before = shard_bytes(copy / "ref")
    proc = finish(cli(copy, "ref", "--shard-size", TINY_SHARD, "--resume"))
    assert proc.returncode == 1 and "already complete" in proc.stderr, proc.stderr
    assert shard_bytes(copy / "ref") == before


# -- what a resumed run trusts: its own files only, one run at a time ------------------------------------------------

def test_resume_never_follows_a_symlink_planted_at_a_shard_name(interrupted, tmp_path):
    root, ref, done = interrupted
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    out = copy / "out"
    todo = sorted(ref)[len(done)]                      # the next shard: the resumed run writes it
    (out / (todo + ".partial")).unlink(missing_ok=True)
    (out / (todo + ".partial")).symlink_to(tmp_path / "victim")
    kept = out / (done[0] + ".partial")                # a recorded shard swapped for a link to a good copy
    shutil.copyfile(kept, tmp_path / "copy-of-shard")
    kept.unlink()
    kept.symlink_to(tmp_path / "copy-of-shard")
    proc = finish(cli(copy, "out", "--shard-size", TINY_SHARD, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "victim").exists()
    assert not any(p.is_symlink() for p in out.iterdir())
    assert shard_bytes(out) == ref
    assert done[0] not in resumed(out)


# a field of the wrong type, a top level that is no object, a nesting too deep to parse; the other fields of the
# wrong type (the same check) in `make test-slow`
@pytest.mark.parametrize("manifest", [
    pytest.param('{"fingerprint": [], "shards": {}}', id="fingerprint-list"),
    pytest.param('{"fingerprint": {}, "shards": []}', id="shards-list", marks=pytest.mark.slow),
    pytest.param('{"fingerprint": {}, "shards": {"x": 1}, "files": 3}', id="files-number", marks=pytest.mark.slow),
    pytest.param("[1]", id="list"),
    pytest.param("[" * 100_000 + "]" * 100_000, id="nested")])
def test_a_manifest_of_the_wrong_shape_is_one_line(interrupted, tmp_path, manifest):
    root = interrupted[0]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "out" / MANIFEST).write_text(manifest)
    for flag in ("--resume", "--force"):
        proc = finish(cli(copy, "out", "--shard-size", TINY_SHARD, flag))
        assert "Traceback" not in proc.stderr, proc.stderr
        if flag == "--resume":
            assert proc.returncode == 1 and proc.stderr.startswith("error: out"), proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr


def _stop_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> bool:
    """SIGSTOP ``proc`` as soon as ``ready()``; False if it ended first."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            return True
        time.sleep(0.0005)
    return False


def test_a_second_run_on_a_directory_being_written_is_refused(big):
    root, ref = big
    out = root / "out-locked"
    lock = out / ".lowmerge.lock"
    for _ in range(5):
        shutil.rmtree(out, ignore_errors=True)
        first = cli(root, out.name, "--shard-size", BIG_SHARD)
        if _stop_when(first, lambda: lock.is_file() and lock.read_text().strip() == str(first.pid)):
            break
        finish(first)
    else:
        pytest.fail("the first run never held the lock long enough")
    try:
        second = finish(cli(root, out.name, "--shard-size", BIG_SHARD, "--resume"))
        fresh = finish(cli(root, out.name, "--shard-size", BIG_SHARD))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    done = finish(first)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert second.stderr.splitlines()[0] == f"error: {out.name}: another lowmerge run is writing {out.name} " \
                                            f"(pid {first.pid})"
    assert fresh.returncode == 1 and "another lowmerge run is writing" in fresh.stderr, fresh.stderr
    assert done.returncode == 0, done.stderr
    assert shard_bytes(out) == ref and not lock.exists()


def test_a_held_lock_is_reported_whatever_the_files_look_like(interrupted, tmp_path):
    """A run stopped between writing its manifest's .partial and the rename (a CI failure once): the directory then
    holds no manifest, and a second run must still name the lock holder, not call the files someone else's."""
    out = tmp_path / "copy" / "out"
    shutil.copytree(interrupted[0], tmp_path / "copy")
    shutil.rmtree(out)
    out.mkdir()
    (out / (MANIFEST + ".partial")).write_text("{}")
    fd = os.open(out / ".lowmerge.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        runs = [finish(cli(tmp_path / "copy", "out", "--shard-size", TINY_SHARD, *flag))
                for flag in (["--resume"], ["--force"], [])]
    finally:
        os.close(fd)
    for run in runs:
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.splitlines()[0] == "error: out: another lowmerge run is writing out (pid 4242)", run.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lowmerge.lock", MANIFEST + ".partial"]


def test_sigterm_says_aborted_and_leaves_what_resume_continues(big):
    root, ref = big
    out = root / "out-term"
    for _ in range(5):
        shutil.rmtree(out, ignore_errors=True)
        proc = cli(root, out.name, "--shard-size", BIG_SHARD)
        if _stop_when(proc, lambda: len(recorded(out)) >= 1):
            break
        finish(proc)
    else:
        pytest.fail("the merge never recorded a shard before it ended")
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    stopped = finish(proc)
    assert stopped.returncode == 143 and "Traceback" not in stopped.stderr, stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert lines[0] == "aborted (SIGTERM)" and "--resume" in lines[1], stopped.stderr
    assert looks_complete(out) == [] and recorded(out)
    proc = finish(cli(root, out.name, "--shard-size", BIG_SHARD, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(out) == ref and resumed(out)

"""Hugging Face ids: found in a real cache layout (HF_HUB_CACHE) without network; an uncached id is a clear error."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from conftest import run_cli

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hub: Path, repo: str, src: Path) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, blobs/<hash>, snapshots/<commit>/NAME}, each
    NAME a relative symlink to ../../blobs/<hash>."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    (root / "blobs").mkdir()
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)


def shard(model_dir: Path) -> None:
    """``model_dir`` rewritten as two shards and an index, as save_pretrained writes a large model."""
    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in files.items():
        save_file({n: tensors[n] for n in members}, model_dir / file, metadata={"format": "pt"})
    (model_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: f for f, members in files.items() for n in members}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_cached_ids_merge_like_local_paths(tmp_path: Path, tiny) -> None:
    base, experts = tiny
    hub = tmp_path / "hub"
    cache_model(hub, "org/tiny-base", base)
    for i, e in enumerate(experts):
        cache_model(hub, f"org/tiny-expert{i}", e)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "0"}
    run_cli("merge", base, *experts, "-o", tmp_path / "local", "-q", "--device", "cpu", "-m", "task_arithmetic",
            check=True)
    run_cli("merge", "org/tiny-base", *[f"org/tiny-expert{i}" for i in range(len(experts))], "-o", tmp_path / "hub-out",
            "-q", "--device", "cpu", "-m", "task_arithmetic", env=env, check=True)
    a, b = load_file(tmp_path / "local" / "model.safetensors"), load_file(tmp_path / "hub-out" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (tmp_path / "hub-out" / "config.json").is_file()


def test_an_uncached_id_says_so_at_once(tmp_path: Path, tiny) -> None:
    base, experts = tiny
    proc = run_cli("merge", base, "org/not-downloaded", "-o", tmp_path / "out", "-q", "--device", "cpu",
                   env={"HF_HUB_CACHE": str(tmp_path / "empty-hub")}, timeout=60)
    assert proc.returncode != 0
    assert "org/not-downloaded" in proc.stderr and "Hugging Face cache" in proc.stderr and "never downloads" in \
        proc.stderr, proc.stderr


def test_a_sharded_model_in_the_cache_merges(tmp_path: Path, tiny) -> None:
    """Every file of a cached model is a symlink into ../../blobs: the index's entries are judged, not their targets."""
    base, experts = tiny
    run_cli("merge", base, *experts, "-o", tmp_path / "local", "-q", "--device", "cpu", "-m", "task_arithmetic",
            check=True)
    shard(experts[1])
    hub = tmp_path / "hub"
    cache_model(hub, "org/sharded-expert", experts[1])
    snapshot = hub / "models--org--sharded-expert" / "snapshots" / REVISION
    assert (snapshot / "model-00001-of-00002.safetensors").is_symlink()
    run_cli("merge", base, experts[0], "org/sharded-expert", experts[2], "-o", tmp_path / "hub-out", "-q", "--device",
            "cpu", "-m", "task_arithmetic", env={"HF_HUB_CACHE": str(hub)}, check=True)
    assert (tmp_path / "hub-out" / "model.safetensors").read_bytes() == \
        (tmp_path / "local" / "model.safetensors").read_bytes()


def test_a_missing_path_shaped_like_an_id_is_one_line(tmp_path: Path, tiny) -> None:
    base, experts = tiny
    proc = run_cli("merge", base, "models/my--model", "-o", tmp_path / "out", "-q", timeout=60,
                   env={"HF_HUB_CACHE": str(tmp_path / "empty-hub")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[0] == "error: models/my--model: no such file or directory", proc.stderr

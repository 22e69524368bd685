"""Hugging Face ids: found in a real cache layout (HF_HUB_CACHE) without network; an uncached id is a clear error."""
from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import load_file

from conftest import run_cli

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_model(hub: Path, repo: str, src: Path) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/files}."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REVISION)
    shutil.copytree(src, root / "snapshots" / REVISION)


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

"""The output directory's life: refuse to clobber, resume from a manifest, finish atomically.

The manifest (``lowmerge-manifest.json``) records what must not change between a run and its resumption (the
fingerprint) and each finished shard's sha256. Final names appear only in ``finish``: shards are renamed, then the
index is written, then the manifest is removed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import OutputError
from .writer import MANIFEST_NAME, PARTIAL, Shard, sha256_file, write_index, write_json_atomic

REPORT_NAME = "lowmerge_report.json"


class OutputDir:
    def __init__(self, path: str | Path, fingerprint: dict, *, resume: bool = False, force: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.manifest: dict = {"fingerprint": fingerprint, "shards": {}, "files": []}
        self._previous: set[str] = set()           # --force: what a previous lowmerge run wrote here
        self._prepare(resume, force)

    # -- start --------------------------------------------------------------------------------------------------
    def _prepare(self, resume: bool, force: bool) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise OutputError("exists and is not a directory", path=p, hint="choose another -o")
        entries = sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        manifest_path = p / MANIFEST_NAME
        if resume and manifest_path.is_file():
            self._load_manifest(manifest_path)
            return
        if resume and (p / REPORT_NAME).is_file():
            raise OutputError("this merge is already complete: nothing to resume", path=p,
                              hint="use --force to merge again into it")
        if entries and not (resume or force):
            raise OutputError("output directory exists and is not empty", path=p,
                              hint="use --resume to continue an interrupted merge, --force to replace a previous "
                                   "lowmerge output, or choose another -o")
        if entries and force:
            self._previous = self._previous_output()
        p.mkdir(parents=True, exist_ok=True)
        self.save_manifest()

    def _load_manifest(self, manifest_path: Path) -> None:
        try:
            old = json.loads(manifest_path.read_text())
            old_fp, shards = old["fingerprint"], old["shards"]
        except (ValueError, KeyError, OSError):
            raise OutputError("the resume manifest is unreadable", path=manifest_path,
                              hint="use --force to start the merge again") from None
        changed = _changes(old_fp, self.fingerprint)
        if changed:
            raise OutputError(f"cannot resume: changed since the interrupted run: {'; '.join(changed)}",
                              path=self.path,
                              hint="rerun with the same inputs and options, or use --force to start again")
        self.manifest["files"] = list(old.get("files", []))
        for name, rec in shards.items():
            if self._shard_intact(name, rec):
                self.manifest["shards"][name] = rec
        self.save_manifest()

    def _shard_intact(self, name: str, rec: dict) -> bool:
        part = self.path / (name + PARTIAL)
        return part.is_file() and part.stat().st_size == rec.get("size") and sha256_file(part) == rec.get("sha256")

    def _previous_output(self) -> set[str]:
        """--force: the files a previous lowmerge run wrote here (its manifest or report lists them)."""
        ours: set[str] = set()
        for record in (self.path / MANIFEST_NAME, self.path / REPORT_NAME):
            if record.is_file():
                try:
                    data = json.loads(record.read_text())
                except ValueError:
                    continue
                files = data.get("files", [])
                ours.update(files + [n + PARTIAL for n in files] + [s + PARTIAL for s in data.get("shards", {})])
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
        if heads.is_dir() and not any(heads.iterdir()):
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
        write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def claim(self, names: list[str]) -> None:
        """Refuse to overwrite a file lowmerge did not write; only then remove a previous output (--force).

        ``names`` (relative to the directory) are recorded as this run's, so --force and --resume know them.
        """
        ours = set(self.manifest["files"]) | self._previous
        for name in names:
            if (self.path / name).exists() and name not in ours:
                raise OutputError(f"would overwrite {name!r}, which lowmerge did not write", path=self.path,
                                  hint="move that file away or choose another -o")
        self._remove_previous_output()
        self.add_files(names)

    # -- end -----------------------------------------------------------------------------------------------------
    def finish(self, shards: list[Shard]) -> None:
        """Rename shards to their final names, write the index last, drop the manifest."""
        for shard in shards:
            os.replace(self.path / shard.partial, self.path / shard.name)
        if len(shards) > 1:
            write_index(self.path, shards)
        (self.path / MANIFEST_NAME).unlink(missing_ok=True)

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

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
            self._remove_previous_output()
        p.mkdir(parents=True, exist_ok=True)
        self.save_manifest()

    def _load_manifest(self, manifest_path: Path) -> None:
        try:
            old = json.loads(manifest_path.read_text())
            old_fp, shards = old["fingerprint"], old["shards"]
        except (ValueError, KeyError, OSError):
            raise OutputError("the resume manifest is unreadable", path=manifest_path,
                              hint="use --force to start the merge again") from None
        changed = sorted(k for k in set(old_fp) | set(self.fingerprint) if old_fp.get(k) != self.fingerprint.get(k))
        if changed:
            raise OutputError(f"cannot resume: {', '.join(changed)} changed since the interrupted run", path=self.path,
                              hint="rerun with the same inputs and options, or use --force to start again")
        self.manifest["files"] = list(old.get("files", []))
        for name, rec in shards.items():
            if self._shard_intact(name, rec):
                self.manifest["shards"][name] = rec
        self.save_manifest()

    def _shard_intact(self, name: str, rec: dict) -> bool:
        part = self.path / (name + PARTIAL)
        return part.is_file() and part.stat().st_size == rec.get("size") and sha256_file(part) == rec.get("sha256")

    def _remove_previous_output(self) -> None:
        """--force: delete only what a previous lowmerge run wrote (its manifest or report lists it)."""
        ours: list[str] = []
        for record in (self.path / MANIFEST_NAME, self.path / REPORT_NAME):
            if record.is_file():
                try:
                    data = json.loads(record.read_text())
                except ValueError:
                    continue
                ours += data.get("files", []) + [s + PARTIAL for s in data.get("shards", {})]
                ours.append(record.name)
        for name in set(ours):
            target = self.path / name
            if target.is_file() and target.resolve().parent == self.path.resolve():
                target.unlink()
            elif target.is_dir() and name == "heads":
                for f in target.iterdir():
                    f.unlink()
                target.rmdir()

    # -- during --------------------------------------------------------------------------------------------------
    @property
    def done_shards(self) -> dict[str, dict]:
        return self.manifest["shards"]

    def record_shard(self, name: str, record: dict) -> None:
        self.manifest["shards"][name] = record
        self.save_manifest()

    def save_manifest(self) -> None:
        write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def check_free(self, names: list[str]) -> None:
        """Refuse to overwrite a file lowmerge did not write (after --force removed our own)."""
        ours = set(self.manifest["files"])
        for name in names:
            if (self.path / name).exists() and name not in ours:
                raise OutputError(f"would overwrite {name!r}, which lowmerge did not write", path=self.path,
                                  hint="move that file away or choose another -o")

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

"""The run directory: the contract between pipeline stages.

    runs/my_release/
      config.yaml      the resolved config of the latest invocation
      manifest.json    per stage: cache key, config it ran with, output files and their sha256
      prepare/         one folder per stage, written whole or not at all
      .lock            held by the one command at work on the run (`RunDir.in_use`)
      ...

A stage builds its folder under `.partial/` and only a finished folder is renamed into place,
followed by the manifest entry. A stage is skipped when its key (config sections it depends on,
plus the hashes of the upstream outputs it reads) matches the manifest and its files still hash
to what the manifest recorded, so editing or deleting an output makes the stage run again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see RunDir.in_use)
    fcntl = None  # type: ignore[assignment]

import numpy as np

from unpersonal import __version__
from unpersonal.config import Config
from unpersonal.errors import UserError

LOCK_FILE = ".lock"

MANIFEST_FORMAT = 1
_HASH_CHUNK = 1 << 20


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see either the old content or the new, never a torn one."""
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_npz_atomic(path: Path, **arrays: Any) -> None:
    """Arrays to one uncompressed .npz, written as `write_atomic` writes."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value that does not depend on key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class RunDir:
    """One run's folder; stages read and write only through it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    def stage_path(self, stage: str) -> Path:
        return self.root / stage

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the run for one command, so that a second command on the same run directory
        stops with an error instead of working beside the first (two `generate`s would clear
        and fill one work folder). An advisory lock (`flock`) on `.lock`, which the system
        releases when the process ends, however it ends; none where there is no `fcntl`
        (Windows). The processes of one `accelerate launch` share the run by design: only the
        first (`RANK` 0, or no launcher) holds it. A run directory that the command created
        and left empty (a refused command) is removed again."""
        if fcntl is None or os.environ.get("RANK", "0") != "0":
            yield
            return
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / LOCK_FILE
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise UserError(f"{self.root} is in use by another unpersonal command (process "
                                f"{holder}): wait for it to end, or stop it") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield
            finally:
                if created and [p.name for p in self.root.iterdir()] == [LOCK_FILE]:
                    lock.unlink()
                    self.root.rmdir()

    def manifest(self) -> dict[str, Any]:
        """Which stages are finished, with their keys and output hashes.

        A manifest that cannot be read is an error, never an empty run: it is what tells every
        stage that its inputs are the ones it was made from.
        """
        if not self.manifest_path.exists():
            return {"format": MANIFEST_FORMAT, "stages": {}}
        damaged = (f"{self.manifest_path} is damaged ({{}}): it records which stages are "
                   "finished; restore it, or delete it to redo every stage")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(damaged.format("not JSON")) from None
        stages = manifest.get("stages") if isinstance(manifest, dict) else None
        if not isinstance(stages, dict) or not all(map(_is_stage_record, stages.values())):
            raise UserError(damaged.format("not a manifest"))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{self.manifest_path} has format {manifest.get('format')}, "
                            f"this unpersonal reads format {MANIFEST_FORMAT}")
        return manifest

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.manifest()["stages"].get(stage)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2) + "\n")

    def require(self, stage: str, command: str | None = None) -> dict[str, str]:
        """Output hashes of a finished upstream stage, or an error saying which command
        (`command`, by default the stage's name) makes it."""
        record = self.stage_record(stage)
        if record is None or not self.stage_path(stage).is_dir():
            raise UserError(f"{self.root} has no finished '{stage}' stage; run `unpersonal "
                            f"{command or stage} --out {self.root}` first")
        return record["outputs"]

    def is_fresh(self, stage: str, key: str) -> bool:
        """True when the stage ran with this key and its outputs are intact."""
        record = self.stage_record(stage)
        if record is None or record.get("key") != key:
            return False
        folder = self.stage_path(stage)
        for relative, digest in record["outputs"].items():
            path = folder / relative
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def work_dir(self, stage: str, key: str) -> Path:
        """A persistent folder for a long stage's resumable state (checkpoints).

        It survives a kill, so rerunning the same command resumes. State left by a different key
        (another config or other inputs) cannot be resumed and is discarded.
        """
        folder = self.root / ".work" / stage
        key_file = folder / "key"
        if folder.exists() and (not key_file.is_file() or key_file.read_text() != key):
            shutil.rmtree(folder)
        if not folder.exists():
            folder.mkdir(parents=True)
            write_atomic(key_file, key)
        return folder

    def resumable_work_dir(self, stage: str, key: str, force: bool) -> Path:
        """`work_dir`, emptied first when the user asked to redo the stage (`--force`)."""
        if force:
            self.clear_work(stage)
        return self.work_dir(stage, key)

    def clear_work(self, stage: str) -> None:
        shutil.rmtree(self.root / ".work" / stage, ignore_errors=True)
        _remove_if_empty(self.root / ".work")

    @contextmanager
    def build_stage(self, stage: str, key: str, config: Config | None,
                    started: float | None = None) -> Iterator[Path]:
        """Yield an empty folder to build `stage` in; publish it only if the block succeeds.

        `config` becomes the run's config.yaml; None leaves that file alone (a stage run with
        a config derived from the user's, such as the audit's own models). `started` (a
        `time.monotonic()`) is when the stage began: the manifest keeps the seconds from then to
        publishing (for a resumed stage, its last part).

        On any exception the partial folder is removed, and so is the run directory itself when
        this call created it: a failed first run leaves nothing behind.
        """
        created_root = not self.root.exists()
        partial = self.root / ".partial" / f"{stage}-{os.getpid()}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        try:
            yield partial
            self._publish(stage, key, config, partial, started)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            if created_root:
                shutil.rmtree(self.root, ignore_errors=True)
            else:
                _remove_if_empty(self.root / ".partial")
            raise
        _remove_if_empty(self.root / ".partial")

    def _publish(self, stage: str, key: str, config: Config | None, partial: Path,
                 started: float | None) -> None:
        outputs = {
            str(path.relative_to(partial)): sha256_file(path)
            for path in sorted(partial.rglob("*")) if path.is_file()
        }
        target = self.stage_path(stage)
        if target.exists():
            retired = self.root / ".partial" / f"{stage}-retired-{os.getpid()}"
            os.replace(target, retired)
            os.replace(partial, target)
            shutil.rmtree(retired)
        else:
            os.replace(partial, target)
        if config is not None:
            write_atomic(self.root / "config.yaml", config.to_yaml())
        manifest = self.manifest()
        manifest["stages"][stage] = {
            "key": key,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": None if started is None else round(time.monotonic() - started, 1),
            "unpersonal": __version__,
            "outputs": outputs,
        }
        self.write_manifest(manifest)


def _is_stage_record(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("key"), str)
            and isinstance(record.get("outputs"), dict))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass

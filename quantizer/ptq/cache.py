"""On-disk cache of calibration results (quantizer stats), so a worker restart does not recalibrate.

An entry is two files in the cache directory:
  <key>.<sha256[:16]>.safetensors   the stats, content-addressed
  <key>.json                        manifest: key, key parts, versions, creation time, sha256 and tensor names
The manifest is written last and names its tensor file, so a reader always sees a complete, matching pair.
Both are written to a temp file in the same directory and os.replace()d into place: concurrent writers
never leave a partial file, and the last manifest rename wins. Anything that does not verify (unreadable
JSON or safetensors, checksum, key or tensor names differing) is reported with warnings.warn and recomputed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

import quantizer
from quantizer.constants import DEFAULT_CALIBRATION_CACHE_DIR  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


class CacheCorruptionWarning(RuntimeWarning):
    """A cache entry failed verification and was ignored (it will be recomputed)."""


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cache key parts must be JSON-serialisable, got {type(value).__name__}")


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of key_parts (sorted keys, tuples as lists)."""
    return hashlib.sha256(canonical_json(dict(key_parts)).encode()).hexdigest()


def hash_state_dict(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Deterministic sha256 of a state dict: names (sorted), dtypes, shapes and raw bytes of every tensor."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def hash_tensor(tensor: torch.Tensor) -> str:
    return hash_state_dict({"tensor": tensor})


def _versions() -> dict[str, str]:
    import diffusers

    return {"ptq4dm": quantizer.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temp file next to `path`, fsync, then os.replace: readers see old or new, never partial."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CorruptEntry(Exception):
    """Internal: the entry exists but does not verify."""


class _Retry(Exception):
    """Internal: the manifest named a tensor file that is gone; re-read the manifest once."""


class CalibrationCache:
    """Stats cache under `directory`, keyed by cache_key(key_parts).

    read_only: a cache shipped with a model (input, not state): entries are read and verified, never written
    or removed, so a bad one is reported each time instead of being discarded.
    """

    def __init__(self, directory: str | Path, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only

    def manifest_path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key_parts: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """The cached stats, or None on a miss or a corrupted entry (which is warned about and removed)."""
        key = cache_key(key_parts)
        for attempt in range(2):
            try:
                return self._read(key, key_parts, final=attempt == 1)
            except FileNotFoundError:
                return None
            except _Retry:
                continue  # a concurrent store may have just replaced the entry: read the new manifest
            except CorruptEntry as exc:
                message = f"calibration cache entry {key[:16]} in {self.directory} is corrupted ({exc}); recomputing"
                warnings.warn(message, CacheCorruptionWarning, stacklevel=2)
                logger.warning(message)
                if not self.read_only:
                    self._discard(key)
                return None
        return None

    def store(self, key_parts: Mapping[str, Any], stats: Mapping[str, torch.Tensor],
              extra: Mapping[str, Any] | None = None) -> Path:
        """Write stats and their manifest atomically; returns the manifest path. Safe to race with other stores."""
        if self.read_only:
            raise PermissionError(f"calibration cache {self.directory} is read-only")
        key = cache_key(key_parts)
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in stats.items()}
        data = safetensors.torch.save(tensors, metadata={"key": key})
        sha = hashlib.sha256(data).hexdigest()
        data_path = self.directory / f"{key}.{sha[:16]}.safetensors"
        atomic_write(data_path, lambda tmp_path: tmp_path.write_bytes(data))
        manifest = {
            "format": MANIFEST_FORMAT,
            "key": key,
            "key_parts": json.loads(canonical_json(dict(key_parts))),
            "file": data_path.name,
            "sha256": sha,
            "tensors": sorted(tensors),
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(),
            "extra": json.loads(canonical_json(dict(extra or {}))),
        }
        path = self.manifest_path(key)
        atomic_write(path, lambda tmp_path: tmp_path.write_text(json.dumps(manifest, indent=2, sort_keys=True)))
        logger.info("stored calibration stats %s (%d tensors)", path, len(tensors))
        return path

    def get_or_compute(self, key_parts: Mapping[str, Any],
                       compute_fn: Callable[[], Mapping[str, torch.Tensor]],
                       extra: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Cached stats for key_parts; on a miss (or corrupted entry) compute_fn() is called and stored."""
        cached = self.load(key_parts)
        if cached is not None:
            logger.info("calibration cache hit %s", cache_key(key_parts)[:16])
            return cached
        logger.info("calibration cache miss %s: calibrating", cache_key(key_parts)[:16])
        stats = dict(compute_fn())
        self.store(key_parts, stats, extra)
        return stats

    def manifests(self) -> list[dict[str, Any]]:
        """Every readable manifest in the directory (for reporting what a cache holds); unreadable ones skipped."""
        found = []
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                manifest = json.loads(path.read_text())
                if isinstance(manifest, dict):
                    found.append(manifest)
        return found

    def _read(self, key: str, key_parts: Mapping[str, Any], final: bool) -> dict[str, torch.Tensor]:
        path = self.manifest_path(key)
        text = path.read_text()  # FileNotFoundError: a miss
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CorruptEntry(f"unreadable manifest: {exc}") from exc
        if not isinstance(manifest, dict):
            raise CorruptEntry("manifest is not a JSON object")
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("key") != key:
            raise CorruptEntry("manifest format or key mismatch")
        if manifest.get("key_parts") != json.loads(canonical_json(dict(key_parts))):
            raise CorruptEntry("manifest key parts differ from the request")
        file_name = manifest.get("file")
        if not isinstance(file_name, str) or not file_name.startswith(f"{key}.") or "/" in file_name:
            raise CorruptEntry("manifest names no valid tensor file")
        try:
            data = (self.directory / file_name).read_bytes()
        except FileNotFoundError:
            if final:
                raise CorruptEntry(f"tensor file {file_name} named by the manifest is missing") from None
            raise _Retry from None
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            raise CorruptEntry("sha256 of the tensor file does not match the manifest")
        try:
            stats = safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptEntry(f"unreadable safetensors file: {exc}") from exc
        if sorted(stats) != manifest.get("tensors"):
            raise CorruptEntry("tensor names differ from the manifest")
        return stats

    def _discard(self, key: str) -> None:
        """Remove a bad entry so it is not reported again (best effort: another process may be rewriting it)."""
        for path in [self.manifest_path(key), *self.directory.glob(f"{key}.*.safetensors")]:
            with contextlib.suppress(OSError):
                path.unlink()

"""Files that are never half-written, JSON-ready values and short digests: one copy for every module.

Every file the project writes for a user to read back (records, results, checkpoints, merged models)
goes through a temporary name in the same folder and one rename, so a crash or Ctrl-C leaves either
the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

STAGING_PREFIX = ".tmp-"


def staging_name(path: Path, prefix: str = STAGING_PREFIX) -> Path:
    """A fresh name beside `path` for its temporary copy (same folder, so the final rename is atomic)."""
    return path.with_name(f"{prefix}{path.name}.{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_open(path: str | Path, prefix: str = STAGING_PREFIX) -> Iterator[IO[str]]:
    """Open a text handle whose content replaces `path` only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(path, prefix)
    # os.open with 0o666 (not mkstemp's 0o600): the finished file gets the permissions the umask gives
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, prefix: str = STAGING_PREFIX) -> Path:
    """Write a whole text file under a temporary name and rename it into place."""
    with atomic_open(path, prefix) as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """Write `json_safe(value)` as strict JSON (no NaN / Infinity), atomically."""
    text = json.dumps(json_safe(value), indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write one JSON value per line, atomically (`default=str` for dates and paths)."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return Path(path)


def current_umask() -> int:
    """The process's umask (from /proc where there is one, so it is never changed, even for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_permissions(folder: str | Path) -> Path:
    """Give every file and folder under `folder` (and itself) the permissions the umask gives new ones.
    Libraries that write through temporary files leave them private: safetensors' `save_file` writes
    0600, which a user's other tools (a shared model store, a web server) then cannot read."""
    folder = Path(folder)
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
    return folder


def replace_dir(staging: str | Path, final: str | Path, prefix: str = STAGING_PREFIX) -> Path:
    """Move a finished folder into place; an existing `final` is swapped out first, then removed."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.with_name(f"{prefix}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


@contextmanager
def atomic_dir(final: str | Path, prefix: str = STAGING_PREFIX) -> Iterator[Path]:
    """Yield an empty folder beside `final` that becomes `final` when the block ends without error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_name(final, prefix)
    staging.mkdir()  # not mkdtemp, whose 0o700 the finished folder would keep
    try:
        yield staging
        replace_dir(staging, final, prefix)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: non-finite floats become None (strict JSON has no Infinity), tensors are
    summarised by shape, other objects by `repr`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):  # a tensor or an array: its shape, not its values
        return {"tensor_shape": list(shape)}
    return repr(value)


def digest(*parts: Any, length: int = 16) -> str:
    """Short stable hash of JSON-able parts (key order ignored): a cache entry is reused only if it matches."""
    payload = json.dumps(json_safe(list(parts)), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def decode_utf8(raw: bytes, where: str | Path, error: type[Exception] = ValueError, first_line: int = 1) -> str:
    """`raw` as UTF-8 text; otherwise `error` naming `where` and the line of the first undecodable byte
    (`first_line`: the line `raw` starts on), so every reader reports bad bytes the same way."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        raise error(f"{where}:{line}: not UTF-8 text (byte {raw[err.start]:#x})") from err

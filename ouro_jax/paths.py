"""Paths: local files and object stores (`gs://`) alike, through `etils.epath`.

`as_path` is the one conversion: local paths become absolute (as `os.path.abspath`), URIs stay as
they are. Object stores have no atomic rename, no append and no memory maps; the helpers here keep
the guarantees of the local code on them:

- `write_atomic`: locally a temporary file and `os.replace`; on an object store one upload (an object
  appears whole or not at all).
- `move_tree`: locally one rename; on an object store copy + delete, the `commit` file (what marks a
  directory complete) copied last and deleted first, so at every moment the source or the target is complete.
- `replace_tree` / `remove_leftovers`: publish a finished temporary directory over an old one, and clean
  up what a killed publish left; a leftover is removed only when it is incomplete or the target is complete.
- `check_output`: what an output may be: never the current directory, a source or a folder above one,
  a training workdir, or (replaced) anything but a previous output of the same kind.
- `local_copy`: a verified copy of a remote file in a local cache, for readers that need a local file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sys
import tempfile

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike
CACHE_ENV = "OURO_JAX_CACHE_DIR"
# gcsfs logs a traceback for every request that runs out of retries, then raises: the error is reported once.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)


def is_local(path: PathLike) -> bool:
    """True for a path of the local filesystem, False for a URI (`gs://...`)."""
    return "://" not in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths absolute, URIs untouched."""
    text = os.fspath(path)
    return epath.Path(os.path.abspath(text) if is_local(text) else text)


def exists(path: PathLike) -> bool:
    """Whether `path` exists (locally also a dangling symlink, as `os.path.lexists`)."""
    path = as_path(path)
    return os.path.lexists(path) if is_local(path) else path.exists()


def check_bucket(path: PathLike) -> None:
    """Raises FileNotFoundError naming the bucket when `path` is on an object store whose bucket does not
    exist (before a write that would fail later with a less clear error); local paths pass."""
    path = as_path(path)
    if is_local(path):
        return
    scheme, rest = os.fspath(path).split("://", 1)
    bucket = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
    try:
        next(iter(bucket.iterdir()), None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: bucket {bucket} does not exist") from None


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Writes `data` to `path` so that a reader sees the old or the new content, never a torn file."""
    path = as_path(path)
    mode = "w" if isinstance(data, str) else "wb"
    if not is_local(path):
        with path.open(mode) as f:
            f.write(data)
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open(mode) as f:
        f.write(data)
    os.replace(tmp, path)


def files(root: PathLike) -> list[epath.Path]:
    """Every file under the directory `root`, recursively, in sorted order."""
    out = []
    for child in sorted(as_path(root).iterdir()):
        out.extend(files(child) if child.is_dir() else [child])
    return out


def copy_tree(src: PathLike, dst: PathLike, commit: str | None = None) -> list[epath.Path]:
    """Copies the file or directory `src` to `dst`, files named `commit` last; returns the source files."""
    src, dst = as_path(src), as_path(dst)
    if not src.is_dir():
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.copy(dst)
        return [src]
    found = sorted(files(src), key=lambda p: p.name == commit)
    for f in found:
        target = dst / os.path.relpath(f, src)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.copy(target)
    return found


def move_tree(src: PathLike, dst: PathLike, commit: str | None = None) -> None:
    """Moves the file or directory `src` to `dst` (which must not exist). Locally one rename; otherwise a
    copy (files named `commit` last), then a delete (those first)."""
    src, dst = as_path(src), as_path(dst)
    if is_local(src) and is_local(dst):
        os.rename(src, dst)
        return
    if dst.exists():
        raise FileExistsError(f"{dst} already exists")
    for f in reversed(copy_tree(src, dst, commit)):
        f.unlink()
    src.rmtree(missing_ok=True)


def make_temp_dir(parent: PathLike, prefix: str) -> epath.Path:
    """A new empty directory `parent/PREFIXrandom` (private locally, as `tempfile.mkdtemp`)."""
    parent = as_path(parent)
    if is_local(parent):
        return epath.Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path = parent / f"{prefix}{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    return path


def replace_tree(new: PathLike, target: PathLike, commit: str) -> None:
    """Puts the finished directory `new` in place as `target`; an existing `target` is moved to a hidden
    `.NAME.old-*` beside it first and removed only once the new one is in place (restored on failure)."""
    new, target = as_path(new), as_path(target)
    old = None
    if exists(target):
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(2)}")
        move_tree(target, old, commit)
    try:
        move_tree(new, target, commit)
    except BaseException:
        if old is not None and not target.exists():
            move_tree(old, target, commit)
        raise
    if old is not None:
        if os.path.islink(old):
            os.unlink(old)
        else:
            old.rmtree(missing_ok=True)


def _holds(outer: str, inner: str) -> bool:
    """Whether the path `outer` is `inner` or a folder above it (real paths locally, URIs as written)."""
    outer, inner = outer.rstrip("/"), inner.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def _canonical(path: PathLike) -> str:
    path = as_path(path)
    return os.path.realpath(path) if is_local(path) else os.fspath(path)


def check_output(target: PathLike, *, kind: str, marker: str, sources: tuple[PathLike, ...] = (),
                 overwrite: bool = False, other_files: bool = False) -> None:
    """Refuses an output directory that writing `kind` there could destroy: the current directory or a folder
    above it, a source or a folder above one, a training workdir, a file, an existing `kind` (its `marker`
    file present) without `overwrite`, and a non-empty directory of another kind (unless `other_files`: the
    writer keeps the files it does not own)."""
    target = as_path(target)
    where = _canonical(target)
    if is_local(target) and _holds(where, os.path.realpath(os.getcwd())):
        raise FileExistsError(f"{target}: is the current directory or holds it; refusing to write {kind} there")
    for source in sources:
        if _holds(where, _canonical(source)):
            raise FileExistsError(f"{target}: is the source {source} or holds it; refusing to write {kind} there")
    if not exists(target):
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if (target / "checkpoints").is_dir():
        raise FileExistsError(f"{target}: a training workdir (it holds checkpoints/); refusing to write {kind} there")
    if (target / marker).exists():
        if not overwrite:
            raise FileExistsError(f"{target} already holds {kind}; pass --overwrite to replace it")
    elif not other_files and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty and not {kind} (no {marker}); --overwrite replaces only "
                              f"a previous {kind}: choose a new or empty directory")


def check_writable(directory: PathLike) -> None:
    """Creates `directory` if needed and writes and removes a small file there: a read-only or full
    filesystem fails here at once, naming the directory, instead of in a writer's retries much later."""
    directory = as_path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{directory}: not writable ({e.strerror or e})") from None


def _complete(path: epath.Path, commit: str) -> bool:
    return (path / commit).exists()


def remove_leftovers(target: PathLike, commit: str, what: str) -> list[epath.Path]:
    """Removes the hidden `.NAME.tmp-*` / `.NAME.old-*` directories beside `target` that a killed write
    left (`what` names it in the message). A complete leftover is kept while `target` is incomplete: it
    may be the only complete copy. Returns the removed paths."""
    target = as_path(target)
    if not target.parent.exists():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    found = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes))
    removed = []
    for path in found:
        complete = _complete(path, commit)
        if complete and not _complete(target, commit):
            print(f"keeping {path}: a complete copy left by an interrupted {what} while {target} is incomplete; "
                  "move it into place or remove it", file=sys.stderr, flush=True)
            continue
        label = "leftover" if complete else "incomplete output"
        print(f"removing {path}: the {label} of an interrupted {what}", file=sys.stderr, flush=True)
        path.rmtree(missing_ok=True)
        removed.append(path)
    return removed


def cache_dir() -> epath.Path:
    """Where remote files are cached locally: $OURO_JAX_CACHE_DIR, else ~/.cache/ouro_jax."""
    return as_path(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ouro_jax"))


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def local_copy(path: PathLike, sha256: str, suffix: str = "") -> str:
    """A local file with the content of `path` whose SHA-256 is `sha256`: `path` itself when local, else a
    copy in `cache_dir()` named by the hash (downloaded once, checked while downloading)."""
    path = as_path(path)
    if is_local(path):
        return os.fspath(path)
    cached = cache_dir() / f"{sha256}{suffix}"
    if cached.exists():
        return os.fspath(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    with path.open("rb") as src, tmp.open("wb") as dst:
        for block in iter(lambda: src.read(1 << 22), b""):
            digest.update(block)
            dst.write(block)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise ValueError(f"{path}: does not match its SHA-256 {sha256} (corrupted or replaced)")
    os.replace(tmp, cached)
    return os.fspath(cached)

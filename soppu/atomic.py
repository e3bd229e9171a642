"""Write files and directories so that a crash leaves either the old thing or the new one.

Every file that matters is written to a temporary sibling and renamed into place; a directory
is built whole under a temporary name and swapped in with one atomic exchange. Around that:

- writers of one target are serialised by a lock beside it (`.NAME.lock`, removed after);
  a second waits;
- every temporary directory has an owner file beside it (`.NAME.XXXX.building.owner`) that
  its writer holds locked; a killed writer's lock is released by the kernel, so the next
  writer in that folder recognises the leftover by the lockable owner file (never by its name
  alone) and removes it;
- `replace=True` (a user's `--overwrite`) replaces only a folder SOPPU wrote (it holds the
  `.soppu` stamp written into every built folder) and never one that holds the inputs;
- built files follow the umask (0644/0755 under the usual 022), so a LoRAX or vLLM process
  under another account can read them; `private=True` (the users' text) makes them 0600/0700.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from soppu.errors import SoppuError

STAMP = ".soppu"  # in every folder this module built: what --overwrite may replace
_OWNER = ".owner"
_TEMP_KINDS = (".building", ".scratch")
_MAX_PREFIX = 100  # temp and lock names stay far below the 255-byte name limit


class WriteRefused(SoppuError, ValueError):
    """A write that would lose or clobber something; the message names the path and why."""


class TargetExists(SoppuError, FileExistsError):
    """The target is there and replacing it was not asked for."""


def write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{_short(path.name)}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), _file_mode(private))
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str, *, private: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), private=private)


def write_json(path: Path, obj: Any, *, private: bool = False) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
    write_text(path, text, private=private)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


@contextlib.contextmanager
def building_dir(
    target: Path,
    *,
    replace: bool = False,
    inputs: Iterable[Path] = (),
    private: bool = False,
    locked: bool = True,
    cache: bool = False,
    kind: str = "",
) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it becomes `target` in one step.

    On any error the temporary directory is removed and `target` is untouched. `replace`:
    an existing target SOPPU wrote is swapped out atomically (see the module docstring);
    `cache`: the caller owns this place (a cache, a staging area) and anything there goes.
    `locked=False` when the caller already holds a lock covering `target` (a version root).
    `kind` (a store, an adapter, …) goes into the stamp; `replace` swaps out only its kind.
    Leaving the block normally, by a `return` too, commits what the folder then holds.
    """
    target = Path(target)
    check_target(target, replace=replace or cache, inputs=inputs, stamped=not cache, kind=kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock(target) if locked else contextlib.nullcontext():
        if target.exists() and not (replace or cache):  # another writer made it meanwhile
            raise TargetExists(f"{target} already exists")
        clean_leftovers(target.parent)
        with owned_temp(target, ".building") as tmp:
            yield tmp
            stamp = {"written_by": "soppu", **({"kind": kind} if kind else {})}
            write_json(tmp / STAMP, stamp, private=private)
            _set_modes(tmp, private)
            _fsync_tree(tmp)
            if target.exists() or target.is_symlink():
                _exchange(tmp, target)  # tmp now holds the old one; owned_temp removes it
            else:
                os.rename(tmp, target)
            _fsync_dir(target.parent)


def check_target(
    target: Path,
    *,
    replace: bool,
    inputs: Iterable[Path] = (),
    stamped: bool = True,
    kind: str = "",
) -> None:
    """Refuse, before any work, a target that cannot or must not be written: `--overwrite`
    replaces only a folder SOPPU wrote, and only one of the same `kind` (a store by a store,
    never a serving version or a user's adapter)."""
    target = Path(target)
    if len(os.fsencode(target.name)) > 255:
        raise WriteRefused(f"{target}: name is {len(os.fsencode(target.name))} bytes (max 255)")
    if target.is_symlink():
        raise WriteRefused(f"{target} is a symlink; give the real path")
    for source in inputs:
        if Path(source).resolve().is_relative_to(target.resolve()):
            raise WriteRefused(f"{target} holds the input {source}; write somewhere else")
    if not target.exists():
        return
    if not replace:
        raise TargetExists(f"{target} already exists; pass --overwrite to replace it")
    if not target.is_dir():
        raise WriteRefused(f"{target} is a file; --overwrite replaces only a folder SOPPU wrote")
    if stamped and not written_by_soppu(target):
        raise WriteRefused(f"{target} was not written by SOPPU (no {STAMP}); not replacing it")
    if stamped and kind and (found := folder_kind(target)) not in ("", kind):
        wanted = with_article(kind)
        raise WriteRefused(
            f"{target} is {with_article(found)}, not {wanted}; --overwrite replaces only {wanted}"
        )


def written_by_soppu(folder: Path) -> bool:
    return (Path(folder) / STAMP).is_file()


def folder_kind(folder: Path) -> str:
    """What a folder SOPPU wrote is: its stamp's `kind`, or for one stamped before kinds were
    recorded, what its files say; "" when neither tells."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / STAMP).read_text()).get("kind", "")
    except (OSError, ValueError, AttributeError):
        recorded = ""
    if recorded:
        return str(recorded)
    for marker, kind in KIND_MARKERS:
        if (folder / marker).exists():
            return kind
    return ""


# What a folder's files say it is, first match wins (folders stamped before kinds existed).
KIND_MARKERS = (
    ("adapter_config.json", "adapter"),
    ("soppu_emulator.json", "emulator"),
    ("shared", "serving version"),
    ("slots", "compressed store"),
)


def with_article(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder in `parent` that is removed after use, or by the next writer in
    `parent` if this process is killed meanwhile."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    clean_leftovers(Path(parent))
    with owned_temp(Path(parent) / name, ".scratch") as tmp:
        yield tmp


@contextlib.contextmanager
def owned_temp(target: Path, kind: str) -> Iterator[Path]:
    """A fresh `.NAME.XXXX<kind>` folder beside `target` with its owner file held locked;
    removed (whatever it then holds) on the way out."""
    owner, handle = _claim_owner(target, kind)
    tmp = Path(str(owner).removesuffix(_OWNER))
    try:
        tmp.mkdir()
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(owner)
        handle.close()


def _claim_owner(target: Path, kind: str) -> tuple[Path, TextIO]:
    # Locked under a private name and renamed into view, so a cleaner never sees it unlocked.
    fd, private = tempfile.mkstemp(
        prefix=f".{_short(target.name)}.", suffix=f"{kind}{_OWNER}.new", dir=target.parent
    )
    handle = os.fdopen(fd, "w")
    fcntl.flock(handle, fcntl.LOCK_EX)
    json.dump({"target": target.name, "pid": os.getpid()}, handle)
    handle.flush()
    owner = Path(private.removesuffix(".new"))
    os.rename(private, owner)
    return owner, handle


def clean_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary folders of killed writers in `folder`; returns what went."""
    removed = []
    for owner in Path(folder).glob(f".*{_OWNER}"):
        if not owner.name.removesuffix(_OWNER).endswith(_TEMP_KINDS):
            continue
        with open(owner) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            leftover = Path(str(owner).removesuffix(_OWNER))
            shutil.rmtree(leftover, ignore_errors=True)
            owner.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def lock(target: Path, what: str | None = None) -> Iterator[None]:
    """Exclusive, across processes, on writing `target`; a second writer says so and waits.

    The lock file is removed on release; a waiter that then holds a removed file's lock
    notices (its inode is no longer the path's) and locks the new file instead."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{_short(target.name)}.lock"
    handle = _acquire(path, what or str(target))
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        handle.close()


def _acquire(path: Path, what: str) -> TextIO:
    told = False
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - returned locked, closed by lock()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                handle.seek(0)
                holder = handle.read().strip() or "?"
                print(f"waiting for another soppu (pid {holder}) writing {what}", file=sys.stderr)
                told = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(new: Path, target: Path) -> None:
    """Swap `new` and `target` in one step (Linux renameat2), so no moment lacks `target`;
    where the kernel or file system cannot, fall back to two renames."""
    if _renameat2 is not None:
        args = (_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE)
        if _renameat2(*args) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
    aside = new.with_name(new.name + ".old")
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)


def _file_mode(private: bool) -> int:
    return 0o600 if private else 0o666 & ~_UMASK


def _set_modes(root: Path, private: bool) -> None:
    directory = 0o700 if private else 0o777 & ~_UMASK
    os.chmod(root, directory)
    for path in root.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, directory if path.is_dir() else _file_mode(private))


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _short(name: str) -> str:
    if len(name) <= _MAX_PREFIX:
        return name
    return name[: _MAX_PREFIX - 9] + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]


def point_symlink(link: Path, target_name: str) -> None:
    """Make `link` a relative symlink to `target_name`, switched atomically."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise WriteRefused(f"{link} is a real folder or file, not the symlink SOPPU keeps there")
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target_name, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

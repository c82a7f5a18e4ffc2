"""Where an export may be written, and writing it there without losing anything the user did not ask to replace.

An export replaces a whole directory, so a wrong path would delete a project, the gated source model or the
Trainer's checkpoints. `OutputDir.plan` refuses such targets up front (before minutes of pruning and measuring);
`OutputDir.writing` writes into a temporary folder beside the target (named after this process, so a later run
can recognise and remove it if the process was killed), gives it the usual umask permissions, re-checks the
target, swaps the folder in and only then deletes the previous export.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import REMEDY_FORCE, REMEDY_OVERWRITE, ExportError

EXPORT_MARKER = "dgate_export.json"  # what makes a folder a previous export (hub.SUMMARY_NAME)
TMP_PREFIX = ".hf-dgate-export-"
OLD_PREFIX = ".hf-dgate-old-"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_TMP_NAME = re.compile(r"^\.hf-dgate-export-(\d+)@([A-Za-z0-9_.]*)-[a-z0-9_]+$")
_OLD_NAME = re.compile(r"^\.hf-dgate-old-(\d+)@([A-Za-z0-9_.]*)-[0-9a-f]{8}-(.*)$")


def resolve(path: str | os.PathLike) -> str:
    """The absolute path with symlinks resolved: two spellings of one folder must compare equal."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def local_source(model: Any) -> str | None:
    """The folder a model was loaded from (`config._name_or_path` when that is a local directory), else None."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return resolve(name) if isinstance(name, str) and name and os.path.isdir(name) else None


def is_previous_export(path: str | os.PathLike) -> bool:
    """A folder an export wrote: it holds `dgate_export.json` and only files (an export is flat), so a project
    folder that happens to contain such a file, or a git clone of an export, is not mistaken for one."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, EXPORT_MARKER)):
        return False
    entries = [os.path.join(path, n) for n in os.listdir(path)]
    return all(os.path.islink(e) or not os.path.isdir(e) for e in entries)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A Trainer checkpoint (`checkpoint-N`, or a folder with `trainer_state.json`) or a folder containing one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if _CHECKPOINT.match(os.path.basename(os.path.normpath(path))):
        return True
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return True
    return any(_CHECKPOINT.match(n) and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path))


def checkpoint_dirs(folder: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders directly inside `folder` (what a Trainer run keeps there)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if _CHECKPOINT.match(n)]


def _within(child: str, parent: str) -> bool:
    """`child` is `parent` or lies inside it (both resolved)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:32]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is not a probe there: never call a folder stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def clean_stale(parent: str | os.PathLike) -> list[str]:
    """Remove what an export killed in `parent` left behind (its process, on this host, is gone): temporary folders
    are deleted; a previous export swapped aside whose target is missing is moved back. Returns what was handled."""
    parent = os.fspath(parent)
    done: list[str] = []
    if not os.path.isdir(parent):
        return done
    host = _host()
    for name in os.listdir(parent):
        tmp, old = _TMP_NAME.match(name), _OLD_NAME.match(name)
        m = tmp or old
        if m is None or m.group(2) != host or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(parent, name)
        if old is not None and old.group(3):
            target = os.path.join(parent, old.group(3))
            if not os.path.lexists(target):
                os.replace(path, target)  # killed between the two renames of a swap: the previous export returns
                done.append(target)
                continue
        elif old is not None:
            continue  # target name unknown (too long to encode): keep it rather than guess
        _remove(path)
        done.append(path)
    return done


@dataclass
class OutputDir:
    """An export target with the folders it must never replace. Build it with `OutputDir.plan`."""

    path: str
    sources: list[str] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)
    overwrite: bool = False
    force: bool = False

    @classmethod
    def plan(
        cls,
        target: str | os.PathLike,
        *,
        sources: Iterable[str | os.PathLike | None] = (),
        protected: Iterable[str | os.PathLike | None] = (),
        overwrite: bool = False,
        force: bool = False,
    ) -> OutputDir:
        """Resolve and check `target` (ExportError when it may not be written), then clean stale leftovers beside it.

        sources: folders the exported model comes from (never replaced, contained or written into, even forced).
        protected: folders to keep (training output, checkpoints): never replaced or contained, even forced.
        overwrite: replace a previous export. force: also replace any other folder or file (not the above).
        """
        out = cls(
            resolve(target),
            [resolve(s) for s in sources if s],
            [resolve(p) for p in protected if p],
            bool(overwrite or force),
            bool(force),
        )
        out.check()
        clean_stale(os.path.dirname(out.path))
        return out

    def check(self) -> None:
        """Raise ExportError when writing `path` could delete or alter something the user did not ask to replace."""
        t = self.path
        for s in self.sources:
            if _within(t, s) or _within(s, t):
                raise ExportError(
                    f"The export target {t!r} is, contains or lies inside the model's source folder {s!r}; writing "
                    "there could destroy the source. Choose an output folder outside it."
                )
        for keep, what in [(resolve(os.getcwd()), "the current directory"), (resolve("~"), "your home folder")]:
            if _within(keep, t):
                raise ExportError(
                    f"The export target {t!r} is or contains {what}; replacing it would delete everything in it. "
                    "Choose a new folder, e.g. a subfolder."
                )
        for p in self.protected:
            if _within(p, t):
                raise ExportError(
                    f"The export target {t!r} is or contains {p!r} (training output or checkpoint), which is kept. "
                    "Choose another output folder, e.g. a new subfolder."
                )
        if self.force:
            return
        ckpt = next((a for a in _ancestors(os.path.dirname(t)) if _CHECKPOINT.match(os.path.basename(a))), None)
        if ckpt is not None:
            raise ExportError(
                f"The export target {t!r} lies inside the checkpoint {ckpt!r}, which the Trainer may delete with "
                "everything in it. Choose a folder outside the checkpoint."
            )
        if is_checkpoint_dir(t):  # even an empty `checkpoint-N`: the Trainer would delete the export with it
            raise ExportError(
                f"The export target {t!r} is a training checkpoint or holds checkpoints. Choose another folder, or "
                f"{REMEDY_FORCE} if it really should be deleted."
            )
        if not os.path.lexists(t) or (os.path.isdir(t) and not os.listdir(t)):
            return
        if os.path.isdir(t) and is_previous_export(t):
            if not self.overwrite:
                raise ExportError(
                    f"{t!r} holds a previous export; {REMEDY_OVERWRITE} to replace it, or choose another folder."
                )
            return
        kind = "folder is not empty and" if os.path.isdir(t) else "path is a file and"
        raise ExportError(
            f"The export target {t!r} exists: the {kind} not a previous hf_dgate export (no {EXPORT_MARKER}), so "
            f"it is kept. Choose a new or empty folder, or {REMEDY_FORCE} to replace it."
        )

    @contextmanager
    def writing(self) -> Iterator[str]:
        """Yield a temporary folder beside `path`; on success re-check and swap it in, on any error remove it."""
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}@{_host()}-", dir=parent)
        try:
            yield tmp
            _usual_permissions(tmp)
            self.check()  # the folder may have changed while the model was pruned and measured
            _swap_in(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _usual_permissions(folder: str) -> None:
    """mkdtemp makes folders 0700 and some writers (safetensors) files 0600: give the export what any folder and
    file the user creates gets under their umask."""
    mask = _umask()
    for dirpath, _, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for n in filenames:
            path = os.path.join(dirpath, n)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _ancestors(path: str) -> Iterator[str]:
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return
        yield path
        path = parent


def _swap_in(tmp: str, dst: str) -> None:
    """Move the finished folder `tmp` to `dst`. An existing `dst` is renamed aside first (its name records `dst`,
    so a run killed between the two renames is undone by `clean_stale`) and deleted only once `tmp` is in place."""
    if not os.path.lexists(dst) or (os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst)):
        os.replace(tmp, dst)  # POSIX rename replaces an empty folder atomically
        return
    parent, base = os.path.split(dst)
    name = f"{OLD_PREFIX}{os.getpid()}@{_host()}-{secrets.token_hex(4)}-"
    old = os.path.join(parent, name + (base if len(name) + len(base) <= 255 else ""))
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)


@contextmanager
def updating(target: str | os.PathLike, carry: Callable[[str], bool] = lambda name: True) -> Iterator[str]:
    """Replace the folder `target` atomically with a new version that keeps what the new version does not write.

    Yields an empty temporary folder beside `target` (named like an export's, so `clean_stale` removes it when this
    process dies). When the block ends without error, every entry of the existing `target` that the new version
    lacks and `carry(name)` accepts is linked into it (hard links: no data is copied; copied where links are not
    possible), and the folder is swapped in; the old version stays complete and loadable until that instant. On any
    error the temporary folder is removed and `target` is untouched."""
    path = resolve(target)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{os.fspath(target)!r} is a file; pass a folder to save into.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(parent)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}@{_host()}-", dir=parent)
    try:
        yield tmp
        _usual_permissions(tmp)  # only what this save wrote: linked files keep their own modes
        if os.path.isdir(path):
            written = set(os.listdir(tmp))
            for name in os.listdir(path):
                if name not in written and carry(name):
                    _link_tree(os.path.join(path, name), os.path.join(tmp, name))
            shutil.copymode(path, tmp)
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: str, dst: str) -> None:
    """`src` at `dst` without copying data where the filesystem allows hard links (symlinks stay symlinks)."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)

"""The output folder of ``demo``, ``run`` and ``show``: checked before any work, written whole.

Rules (docs/design.md, "Command line and maps files"):

- ``--out`` must name a folder that is not ``/``, the home folder, the working folder (or a
  folder above it), a symlink, or a folder that holds one of the command's inputs.
- A folder that exists and is not empty is only reused with ``--overwrite``, and only when
  i2am-fast wrote it: its manifest (``.i2am-fast-manifest.json``) lists the files a previous
  run wrote, and ``--overwrite`` removes those files and nothing else.
- The outputs are written into a staging folder inside the output folder and moved into place
  once every one of them is written; a failed run leaves the folder as it found it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Iterator, Sequence

from ..readout.files import process_alive

__all__ = ["MANIFEST", "OutputFolder"]

MANIFEST = ".i2am-fast-manifest.json"
_STAGING_PREFIX = ".i2am-fast-staging-"


def _fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


def _is_within(path: str, folder: str) -> bool:
    """Whether the real path ``path`` lies inside (or is) the real folder ``folder``."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_manifest(folder: str) -> list[str]:
    """The file names a previous i2am-fast run recorded in ``folder`` (plain names only)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            data = json.load(f)
        names = data["files"]
        if data.get("written_by") != "i2am-fast" or not all(isinstance(n, str) for n in names):
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [n for n in names if n and os.path.basename(n) == n and n not in (".", "..")]


class OutputFolder:
    """The checked ``--out`` folder of one command.

    ``inputs``: the paths the command reads (images, masks, pipeline folder, maps file); the
    output folder must not hold any of them. Raises ``SystemExit`` with one line on misuse.
    """

    def __init__(self, path: str, overwrite: bool, inputs: Sequence[str] = ()):
        if not path or not path.strip():
            _fail("--out is empty; pass the folder to write the outputs to.")
        self.path = path
        if os.path.islink(path):
            _fail(f"--out {path} is a symlink; pass the real folder (i2am-fast does not write through links).")
        real = os.path.realpath(path)
        cwd = os.path.realpath(os.getcwd())
        home = os.path.realpath(os.path.expanduser("~"))
        if real == os.path.realpath(os.sep) or real == home or _is_within(cwd, real):
            _fail(f"--out {path} is {'the root folder' if real == os.sep else 'the home folder' if real == home else 'the working folder or a folder above it'}; "
                  "pass a folder of its own, e.g. --out i2am-fast-out.")
        for item in inputs:
            if item and _is_within(os.path.realpath(item), real):
                _fail(f"--out {path} holds the input {item}; write the outputs to another folder.")
        self.previous: list[str] = []
        self.existed = os.path.lexists(path)
        if os.path.lexists(path):
            if not os.path.isdir(path):
                _fail(f"--out {path} exists and is not a folder.")
            entries = [e for e in os.listdir(path) if not e.startswith(_STAGING_PREFIX)]
            if entries:
                recorded = _read_manifest(path)
                if not overwrite:
                    _fail(f"output folder {path} exists and is not empty; pass --overwrite to replace "
                          "what i2am-fast wrote there, or choose another --out.")
                if recorded is None:
                    _fail(f"output folder {path} was not written by i2am-fast (it has no {MANIFEST}); "
                          "--overwrite only replaces i2am-fast's own outputs: choose another --out.")
                self.previous = recorded
            if not os.access(path, os.W_OK | os.X_OK):
                _fail(f"output folder {path} is not writable.")
        else:
            self._probe_creation()

    def _probe_creation(self) -> None:
        """Fails now, before any work, when the folder cannot be made; leaves nothing behind."""
        made, head = [], os.path.abspath(self.path)
        while not os.path.lexists(head):
            made.append(head)
            head = os.path.dirname(head)
        try:
            for folder in reversed(made):
                os.mkdir(folder)
        except OSError as e:
            _fail(f"cannot create the output folder {self.path!r}: {e.strerror or e}.")
        finally:
            for folder in made:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A fresh folder to write the outputs into; on success they replace the previous
        outputs, on failure they are removed (and so is the output folder if it did not exist)."""
        os.makedirs(self.path, exist_ok=True)
        self._remove_stale_staging()
        stage = os.path.join(self.path, f"{_STAGING_PREFIX}{os.getpid()}")
        shutil.rmtree(stage, ignore_errors=True)
        try:
            os.makedirs(stage)
            yield stage
            self._commit(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if not self.existed:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)
            raise

    def _commit(self, stage: str) -> None:
        names = sorted(os.listdir(stage))
        foreign = [n for n in names if os.path.lexists(os.path.join(self.path, n)) and n not in self.previous]
        if foreign:
            _fail(f"output folder {self.path} holds {', '.join(foreign)}, which i2am-fast did not write; "
                  "move them away or choose another --out.")
        for name in self.previous:
            target = os.path.join(self.path, name)
            if os.path.isfile(target) and not os.path.islink(target) and name != MANIFEST:
                os.remove(target)
        for name in names:
            os.replace(os.path.join(stage, name), os.path.join(self.path, name))
        os.rmdir(stage)
        tmp = os.path.join(self.path, f"{MANIFEST}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"written_by": "i2am-fast", "files": names}, f, indent=1)
        os.replace(tmp, os.path.join(self.path, MANIFEST))

    def _remove_stale_staging(self) -> None:
        """Staging folders of runs that were killed (their process is gone)."""
        for name in os.listdir(self.path):
            if not name.startswith(_STAGING_PREFIX):
                continue
            pid = name[len(_STAGING_PREFIX):]
            # this process's own leftover (an earlier failed run in it) goes too
            if pid.isdigit() and (int(pid) == os.getpid() or not process_alive(int(pid))):
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)

"""An exclusive, non-blocking lock on a folder for one run's life: `{folder}/.medsft-run.lock`.

Two runs writing one experiment folder overwrite each other's checkpoints and one's rotation deletes the other's
temporary checkpoint, so the second run to arrive fails at once, naming the folder and the holder (pid, host,
start time, run folder), which the holder writes into the lock file.

- The lock is `flock(LOCK_EX | LOCK_NB)` on the open file: the kernel releases it when the holder exits in any
  way (kill -9 included), so a stale lock file never blocks the next run (its content is simply replaced).
- The holder removes the file when it is done; a newcomer that locked a file unlinked meanwhile notices (the
  inode changed) and retries, so two runs can never both think they hold it.
- Several machines on a shared filesystem: on Linux, NFS emulates flock with byte-range locks held on the
  server, so a second run on another node is refused too (after a crash the server frees a dead client's lock
  when its lease expires, ~90 s on NFSv4); Lustre needs the `flock` mount option (without it flock fails with
  ENOSYS, reported as an error, never silently ignored). Only one process of a run takes the lock
  (medsft.runtime.workspace decides which); a distributed job re-invoked by that process inherits its open
  file (`held_fds()`), so the lock lives as long as any process of the job that holds it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from medsft.config.secrets import redact
from medsft.errors import OutputError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked (logged)
    fcntl = None

log = logging.getLogger("medsft.lock")

LOCK_FILE = ".medsft-run.lock"
_HELD: dict[int, "FolderLock"] = {}  # fd -> lock, for the locks this process holds now


def held_fds() -> tuple[int, ...]:
    """File descriptors of the locks this process holds (a re-invoked job inherits them: medsft.runtime.relaunch)."""
    return tuple(_HELD)


def _holder_text(info: dict) -> str:
    if not info:
        return "another run (its details are not written yet)"
    parts = [f"pid {info.get('pid', '?')} on {info.get('host', '?')}"]
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("run_dir"):
        parts.append(f"run folder {info['run_dir']}")
    return "another run (" + ", ".join(parts) + ")"


class FolderLock:
    """`with FolderLock(folder, what="experiment folder", run_dir=...):` holds the lock for the block."""

    def __init__(self, folder: Path, what: str = "folder", run_dir: Optional[Path] = None, hint: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.run_dir = run_dir
        self.hint = hint
        self.fd: Optional[int] = None

    # ------------------------------------------------------------------------------------------ acquire

    def acquire(self) -> "FolderLock":
        if fcntl is None:  # pragma: no cover - Windows
            log.warning("no fcntl on this platform: %s is not locked against a second run", self.folder)
            return self
        for attempt in range(100):
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputError(f"cannot create the {self.what} {self.folder}: {err.strerror}") from err
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a finishing run removed the emptied folder just now
                continue
            except OSError as err:
                raise OutputError(f"cannot create the lock file {self.path}: {err.strerror}") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd)
                os.close(fd)
                raise OutputError(
                    f"the {self.what} {self.folder} is in use by {_holder_text(info)}: two runs writing one folder "
                    f"overwrite each other's checkpoints. Wait for that run to end{self.hint}"
                ) from None
            except OSError as err:
                os.close(fd)
                raise OutputError(f"cannot lock {self.path} ({err.strerror}): on Lustre mount with `-o flock`") \
                    from err
            if self._still_named(fd):
                break
            os.close(fd)  # its holder removed it between our open and our lock: lock the new one
        else:
            raise OutputError(f"could not lock {self.path}: it kept disappearing (another run starting and ending?)")
        self.fd = fd
        self._write(fd)
        _HELD[fd] = self
        return self

    def _still_named(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def _write(self, fd: int) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "run_dir": str(Path(self.run_dir).resolve()) if self.run_dir is not None else None,
            "command": redact(" ".join(sys.argv))[:1000],
        }
        data = (json.dumps(info, indent=1) + "\n").encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as err:  # the lock holds; only the details for a second run are missing
            log.warning("could not write the lock details into %s: %s", self.path, err)

    # ------------------------------------------------------------------------------------------ release

    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go; an emptied folder is removed too."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        _HELD.pop(fd, None)
        try:
            if self._still_named(fd):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)
        try:
            self.folder.rmdir()  # only when the run left nothing there (it failed before writing anything)
        except OSError:
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

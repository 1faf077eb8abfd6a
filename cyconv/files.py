"""Writing files so that nothing a user saved is ever lost or half-written.

``atomic_write`` writes to a temporary file in the same folder, flushes and
fsyncs it, gives it the permissions a new file gets from the user's umask (or
those of the file it replaces), and renames it over the target: a crash or
``kill -9`` at any moment leaves the old file or the new one, never a broken one.
"""
import os
import tempfile
from pathlib import Path


class OutputError(OSError):
    """A file or folder that cannot be written (says which and why, in one line)."""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path):
    """Delete temporary files of ``path`` left by processes that died while writing."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and int(parts[0]) != os.getpid() \
                and not _pid_alive(int(parts[0])):
            try:
                tmp.unlink()
            except OSError:
                pass


def _umask():
    """The process's umask (read from /proc where possible: setting it is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path):
    """The permissions of the file being replaced, or those of a new file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path, data):
    """Write ``data`` (bytes) to ``path``: temporary file, flush, fsync, rename, fsync folder.

    Raises :class:`OutputError` naming the path when it cannot be written (a folder
    in the way, no permission, a full disk); the old file, if any, is then intact.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder):
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)

"""Checkpoints in safetensors format, written atomically and read with clear errors.

A checkpoint holds the model's ``state_dict`` under PyTorch's keys and
layouts, so that for the same architecture::

    torch_model.load_state_dict(safetensors.torch.load_file("best.safetensors"))

works, and string metadata (JSON values) that lets :func:`load` rebuild the
model alone:

=================  =========================================================
``format``         ``"cyconv"``;  ``format_version``: ``"1"``
``architecture``   list of layer specs (see :mod:`cyconv.models`)
``classes``        class names in label order (or null)
``mean``, ``std``  per-channel normalisation, 0-1 scale (or null)
``image_size``     ``[H, W]`` the model was trained on (or null)
``checksums``      CRC-32 of every tensor's bytes, to detect corruption
anything else      the ``metadata`` given to :func:`save`, JSON-encoded
                   (the trainer stores ``metrics``, ``epoch`` ...)
=================  =========================================================

A resumable training checkpoint (``last.safetensors``, written by
:class:`cyconv.train.Trainer`) is the same file plus tensors under the
``optimizer.`` prefix (and ``average.`` for a moving average of the weights)
and a ``training_state`` metadata field; :func:`load` reads its model too.

Files are written atomically (a temporary file in the same folder, flushed
and fsync'ed, then renamed over the target), so a crash or ``kill -9`` at any
moment leaves the old file or the new one, never a broken one.
"""
import json
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

FORMAT = "cyconv"
FORMAT_VERSION = "1"
EXTRA_PREFIXES = ("optimizer.", "average.")
_RESERVED = ("format", "format_version", "architecture", "classes", "mean", "std",
             "image_size", "checksums")
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
           "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign, or of another architecture."""


# ---------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------

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


def atomic_write(path, data):
    """Write ``data`` (bytes) to ``path``: temporary file, flush, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover (platforms without directory fds)
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def _contiguous(array):
    """A C-contiguous array of the same shape (np.ascontiguousarray turns 0-d into 1-d)."""
    return np.require(np.asarray(array), requirements="C")


def _crc(array):
    return zlib.crc32(_contiguous(array).reshape(-1).view(np.uint8).data)


def _json_list(value):
    return None if value is None else np.asarray(value).tolist()


def save(path, model, metadata=None, *, classes=None, mean=None, std=None, image_size=None,
         extra_tensors=None):
    """Write ``model`` (an nn.Sequential) to ``path`` as a safetensors checkpoint.

    ``classes``/``mean``/``std``/``image_size`` default to the model's
    attributes of those names when it has them (a model from :func:`load`).
    ``metadata``: dict of JSON-able values, stored JSON-encoded.
    ``extra_tensors``: more arrays, each key starting with one of :data:`EXTRA_PREFIXES`.
    """
    from safetensors.numpy import save as st_save

    from cyconv.models import architecture

    tensors = {key: _contiguous(value) for key, value in model.state_dict().items()}
    for key, value in (extra_tensors or {}).items():
        if not key.startswith(EXTRA_PREFIXES) or key in tensors:
            raise ValueError(f"save: extra tensor key {key!r} must start with one of "
                             f"{EXTRA_PREFIXES} and not be a model key")
        tensors[key] = _contiguous(value)
    fields = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": architecture(model),
        "classes": list(classes) if classes is not None else getattr(model, "classes", None),
        "mean": _json_list(mean if mean is not None else getattr(model, "mean", None)),
        "std": _json_list(std if std is not None else getattr(model, "std", None)),
        "image_size": _json_list(image_size if image_size is not None
                                 else getattr(model, "image_size", None)),
        "checksums": {key: _crc(value) for key, value in tensors.items()},
    }
    for key, value in (metadata or {}).items():
        if key in _RESERVED:
            raise ValueError(f"save: metadata key {key!r} is reserved")
        fields[key] = value
    text = {}
    for key, value in fields.items():
        text[key] = value if key in ("format", "format_version") else json.dumps(value)
    atomic_write(path, st_save(tensors, metadata=text))


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

class Checkpoint:
    """What :func:`read` returns: ``tensors`` (dict of numpy arrays), ``metadata``
    (dict of decoded values) and ``path``."""

    def __init__(self, path, tensors, metadata):
        self.path, self.tensors, self.metadata = path, tensors, metadata

    @property
    def model_tensors(self):
        return {k: v for k, v in self.tensors.items() if not k.startswith(EXTRA_PREFIXES)}


def _parse_header(path, data):
    size = len(data)
    if size < 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; "
                              "a safetensors file starts with an 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n > size - 8:
        raise CheckpointError(f"{path}: truncated or not a safetensors file (the header "
                              f"claims {n} bytes, the file has {size - 8} after the length)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: corrupted or not a safetensors file (its header is "
                              f"not valid JSON: {error})") from None
    data_size = size - 8 - n
    ends = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = _DTYPES[dtype] * int(np.prod(shape, dtype=np.int64))
            valid = 0 <= begin <= end and end - begin == expected
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted header: tensor {key!r} has an invalid "
                                  f"entry {info!r:.120}") from None
        if not valid:
            raise CheckpointError(f"{path}: corrupted header: tensor {key!r} ({dtype}, shape "
                                  f"{shape}) has data offsets {[begin, end]}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} needs bytes {begin}-{end} "
                                  f"of the data section, the file has only {data_size}")
        ends.append(end)
    if max(ends, default=0) != data_size:
        raise CheckpointError(f"{path}: corrupted: the data section has {data_size} bytes, "
                              f"the tensors take {max(ends, default=0)}")
    return header


def read(path, verify=True):
    """Read and check a safetensors file -> :class:`Checkpoint`.

    Raises :class:`CheckpointError` naming the tensor or field that is wrong
    when the file is truncated, corrupted (checksum mismatch) or unreadable;
    FileNotFoundError when it does not exist.  Foreign safetensors files
    (without cyconv metadata) are read too: their ``metadata`` is then raw strings.
    """
    from safetensors.numpy import load as st_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    header = _parse_header(path, data)
    raw = header.get("__metadata__") or {}
    try:
        tensors = st_load(data)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable safetensors file: {error}") from None
    metadata = dict(raw)
    if raw.get("format") == FORMAT:
        for key, value in raw.items():
            if key in ("format", "format_version"):
                continue
            try:
                metadata[key] = json.loads(value)
            except (TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupted metadata field {key!r}: not valid "
                                      f"JSON ({value!r:.80})") from None
        if verify:
            checksums = metadata.get("checksums")
            if not isinstance(checksums, dict):
                raise CheckpointError(f"{path}: metadata field 'checksums' is missing or invalid")
            for key in sorted(set(checksums) | set(tensors)):
                if key not in tensors:
                    raise CheckpointError(f"{path}: tensor {key!r} is missing")
                if key not in checksums:
                    raise CheckpointError(f"{path}: tensor {key!r} has no checksum (not "
                                          "written by cyconv, or the header was altered)")
                if _crc(tensors[key]) != checksums[key]:
                    raise CheckpointError(f"{path}: tensor {key!r} is corrupted (its CRC-32 "
                                          "does not match the one stored when it was saved)")
    return Checkpoint(path, tensors, metadata)


def _check_against(path, model, tensors):
    """Every key, shape and dtype of ``tensors`` against the model's state; CheckpointError."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} (shape {list(value.shape)}) that the "
                                  "model needs is missing: a checkpoint of another architecture?")
        got = tensors[key]
        if got.shape != value.shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(got.shape)}, the model "
                                  f"expects {list(value.shape)}: a checkpoint of another "
                                  "architecture?")
        if got.dtype != value.dtype:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {got.dtype}, the model "
                                  f"expects {value.dtype}")
    unexpected = [key for key in tensors if key not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unexpected[:5]} that the model does "
                              "not have: a checkpoint of another architecture?")
    try:
        model.load_state_dict(tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_weights(path, model):
    """Load the weights of checkpoint ``path`` into ``model`` (same architecture), in place.

    Works for any safetensors file with the model's keys (e.g. one saved by
    PyTorch).  Raises :class:`CheckpointError` naming the tensor that is
    missing, unexpected, of another shape or dtype, corrupted or not finite.
    Returns the :class:`Checkpoint`.
    """
    checkpoint = read(path)
    _check_against(checkpoint.path, model, checkpoint.model_tensors)
    return checkpoint


def load(path):
    """Rebuild the model saved in checkpoint ``path`` -> an nn.Sequential in eval mode.

    The model gets the attributes ``classes`` (list of names or None),
    ``mean`` and ``std`` ((3,) float32 arrays or None), ``image_size``
    ((H, W) or None), ``architecture`` (the layer specs) and ``metadata``
    (every metadata field, decoded).  See :func:`predict`.
    """
    from cyconv.models import ArchitectureError, build

    checkpoint = read(path)
    meta = checkpoint.metadata
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise CheckpointError(f"{checkpoint.path}: a safetensors file but not a cyconv checkpoint "
                              "(no 'format': 'cyconv' / 'architecture' metadata); to read its "
                              "weights into a model you built, use cyconv.checkpoint.load_weights")
    try:
        model = build(meta["architecture"])
    except ArchitectureError as error:
        raise CheckpointError(f"{checkpoint.path}: metadata field 'architecture': "
                              f"{error}") from None
    _check_against(checkpoint.path, model, checkpoint.model_tensors)
    for field in ("mean", "std"):
        value = meta.get(field)
        if value is not None and np.shape(value) != (3,):
            raise CheckpointError(f"{checkpoint.path}: metadata field {field!r} must be 3 "
                                  f"numbers, got {value!r:.80}")
        setattr(model, field, None if value is None else np.asarray(value, np.float32))
    classes = meta.get("classes")
    if classes is not None and not isinstance(classes, list):
        raise CheckpointError(f"{checkpoint.path}: metadata field 'classes' must be a list")
    model.classes = classes
    size = meta.get("image_size")
    model.image_size = tuple(size) if size is not None else None
    model.architecture = meta["architecture"]
    model.metadata = meta
    return model.eval()


def predict(model, images, batch_size=64):
    """Logits (N, classes) float32 of a model (in eval mode, without gradients).

    ``images``: (N, H, W, 3) uint8 RGB images (or a list of them), resized to
    ``model.image_size`` when needed and normalised with ``model.mean`` /
    ``model.std``; or an already normalised (N, 3, H, W) float array.
    """
    from cyconv._grad_mode import no_grad
    from cyconv.data import normalize, resize

    model.eval()
    is_float = isinstance(images, np.ndarray) and images.dtype.kind == "f"
    outputs = []
    with no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            if not is_float:
                size = getattr(model, "image_size", None)
                if size is not None:
                    chunk = [resize(np.asarray(image), size) for image in chunk]
                chunk = normalize(np.stack(chunk), getattr(model, "mean", None),
                                  getattr(model, "std", None))
            outputs.append(model(np.ascontiguousarray(chunk, dtype=np.float32)))
    return np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)

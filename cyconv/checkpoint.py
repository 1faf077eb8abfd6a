"""Checkpoints in safetensors format, written atomically and read with clear errors.

A checkpoint holds the model's ``state_dict`` under PyTorch's keys and
layouts, so that for the same architecture::

    torch_model.load_state_dict(safetensors.torch.load_file("best.safetensors"))

works, and string metadata (JSON values) that lets :func:`load` rebuild the
model alone:

======================  =====================================================
``format``              ``"cyconv"``;  ``format_version``: ``"2"``
``architecture``        the model's spec (see :mod:`cyconv.models.spec`)
``classes``             class names in label order (or null)
``mean``, ``std``       per-channel normalisation, 0-1 scale (or null)
``image_size``          ``[H, W]`` the model was trained on (or null)
``channel_order``       ``"RGB"`` or ``"BGR"``: the order the model expects (or null: RGB)
``interpolation``       how photos are resized: ``"area"`` (shrinking; linear when
                        enlarging) or ``"linear"`` (or null: area)
``checksums``           CRC-32 of every tensor's bytes
``metadata_checksum``   CRC-32 of all the other metadata fields
anything else           the ``metadata`` given to :func:`save`, JSON-encoded
                        (the trainer stores ``metrics``, ``epoch`` ...)
======================  =====================================================

Every field is checked on load (type, range, and against the model: as many class
names as outputs), so a flipped byte anywhere in the file is an error, never a
different prediction.  A resumable training checkpoint (``last.safetensors``) is
the same file plus tensors under the ``optimizer.`` and ``average.`` prefixes and
a ``training_state`` field; :func:`load` reads its model too.
"""
import json
import zlib
from pathlib import Path

import numpy as np

from cyconv.files import atomic_write
from cyconv.preprocessing import FIELDS as _PREPROCESSING
from cyconv.preprocessing import PreprocessingError, checked_preprocessing

FORMAT = "cyconv"
FORMAT_VERSION = "2"
EXTRA_PREFIXES = ("optimizer.", "average.")
_RESERVED = ("format", "format_version", "architecture", "checksums",
             "metadata_checksum") + _PREPROCESSING
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
           "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign, or of another architecture."""


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def _contiguous(array):
    """A C-contiguous array of the same shape (np.ascontiguousarray turns 0-d into 1-d)."""
    return np.require(np.asarray(array), requirements="C")


def _crc(array):
    return zlib.crc32(_contiguous(array).reshape(-1).view(np.uint8).data)


def _metadata_crc(text_fields):
    """CRC-32 of every metadata string but the checksum itself, in a fixed order."""
    rest = {k: v for k, v in text_fields.items() if k != "metadata_checksum"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode("utf-8"))


def _json_list(value):
    return None if value is None else np.asarray(value).tolist()


def save(model, path, metadata=None, *, extra_tensors=None, **preprocessing):
    """Write ``model`` to ``path`` as a safetensors checkpoint (atomically).

    The argument order is torch.save's (``save(obj, f)``).  ``classes``, ``mean``,
    ``std``, ``image_size``, ``channel_order``, ``interpolation``, ``center_crop``
    (keywords, see :mod:`cyconv.preprocessing`) default to the model's attributes of
    those names when it has them (a model from :func:`load`).  ``metadata``: dict of
    JSON-able values, stored JSON-encoded.
    ``extra_tensors``: more arrays, each key starting with one of :data:`EXTRA_PREFIXES`.
    """
    from safetensors.numpy import save as st_save

    from cyconv.models import describe
    from cyconv.nn import Module

    if isinstance(model, (str, Path)) and isinstance(path, Module):
        raise TypeError("save(model, path): the model comes first, as in torch.save(obj, f); "
                        f"got the path {str(model)!r} first")
    if not isinstance(model, Module):
        raise TypeError(f"save: expected a cyconv Module, got {type(model).__name__}")
    unknown = set(preprocessing) - set(_PREPROCESSING)
    if unknown:
        raise TypeError(f"save: unexpected keyword(s) {sorted(unknown)}")
    tensors = {key: _contiguous(value) for key, value in model.state_dict().items()}
    for key, value in (extra_tensors or {}).items():
        if not key.startswith(EXTRA_PREFIXES) or key in tensors:
            raise ValueError(f"save: extra tensor key {key!r} must start with one of "
                             f"{EXTRA_PREFIXES} and not be a model key")
        tensors[key] = _contiguous(value)
    fields = {"architecture": describe(model),
              "checksums": {key: _crc(value) for key, value in tensors.items()}}
    for name in _PREPROCESSING:
        value = preprocessing.get(name)
        value = getattr(model, name, None) if value is None else value
        fields[name] = list(value) if name == "classes" and value is not None else (
            _json_list(value) if name in ("mean", "std", "image_size", "center_crop") else value)
    for key, value in (metadata or {}).items():
        if key in _RESERVED:
            raise ValueError(f"save: metadata key {key!r} is reserved")
        fields[key] = value
    text = {"format": FORMAT, "format_version": FORMAT_VERSION}
    text.update({key: json.dumps(value) for key, value in fields.items()})
    text["metadata_checksum"] = str(_metadata_crc(text))
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
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a pipe or a device?)")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from None
    header = _parse_header(path, data)
    raw = header.get("__metadata__") or {}
    try:
        tensors = st_load(data)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable safetensors file: {error}") from None
    if raw.get("format") != FORMAT:
        return Checkpoint(path, tensors, dict(raw))
    metadata = _decode_metadata(path, raw, verify)
    if verify:
        _verify_tensors(path, metadata, tensors)
    return Checkpoint(path, tensors, metadata)


def _decode_metadata(path, raw, verify):
    """The JSON-decoded metadata of a cyconv checkpoint, its checksum verified."""
    version = raw.get("format_version")
    if version not in ("1", FORMAT_VERSION):
        raise CheckpointError(f"{path}: format_version {version!r} is not one this cyconv "
                              f"reads (1 or {FORMAT_VERSION})")
    # version 1 files (cyconv 0.1) have no metadata checksum
    if verify and version != "1" and raw.get("metadata_checksum") != str(_metadata_crc(raw)):
        raise CheckpointError(f"{path}: the metadata is corrupted (its CRC-32 does not "
                              "match the one stored when it was saved)")
    metadata = dict(raw)
    for key, value in raw.items():
        if key in ("format", "format_version", "metadata_checksum"):
            continue
        try:
            metadata[key] = json.loads(value)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted metadata field {key!r}: not valid "
                                  f"JSON ({value!r:.80})") from None
    return metadata


def _verify_tensors(path, metadata, tensors):
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


def load_tensors(model, tensors, path="state"):
    """Load ``tensors`` into ``model`` after checking every key, shape and dtype against
    the model's state (CheckpointError naming the tensor; nothing changes on error)."""
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
    load_tensors(model, checkpoint.model_tensors, checkpoint.path)
    return checkpoint


def load(path):
    """Rebuild the model saved in checkpoint ``path`` -> a Module in eval mode.

    The model gets the attributes ``classes`` (list of names or None), ``mean``
    and ``std`` ((3,) float32 arrays or None), ``image_size`` ((H, W) or None),
    ``channel_order`` ("RGB" or "BGR"), ``interpolation`` ("area" or "linear"), ``architecture``
    (the spec) and ``metadata`` (every field, decoded).  See :func:`cyconv.predict`.
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
    load_tensors(model, checkpoint.model_tensors, checkpoint.path)
    try:
        preprocessing = checked_preprocessing(checkpoint.path, meta, model)
    except PreprocessingError as error:
        raise CheckpointError(str(error)) from None
    for name, value in preprocessing.items():
        setattr(model, name, value)
    model.architecture = meta["architecture"]
    model.metadata = meta
    return model.eval()

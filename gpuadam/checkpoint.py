"""Save and load optimizer state: one ``.npz`` file, no pickle, written atomically, validated on load.

File layout (a zip of ``.npy`` members, readable with ``np.load(path, allow_pickle=False)``):

- ``header``: a uint8 array holding UTF-8 JSON: ``format``, ``version``, ``optimizer`` (class name),
  ``param_groups`` (every hyperparameter and the param indices of each group), ``state`` (per param:
  state name -> dtype name) and ``extra`` (any other plain entries of ``state_dict()``);
- ``steps``: int64, the step count of every param;
- ``state/<i>/<name>``: each state array of param ``i``, shaped like the param. Dtypes that ``.npy``
  cannot describe (``ml_dtypes.bfloat16``) are stored as unsigned integers of the same width and
  viewed back using the dtype name in the header.

``save`` writes a temporary file next to ``path``, fsyncs it, renames it onto ``path`` and fsyncs the
directory: a crash at any point leaves either the old file or the new one, never a mix. A process
killed mid-save leaves a ``<name>.<12 hex digits>.tmp`` file behind (the old checkpoint is intact);
the next ``save`` to the same path removes it. A save in progress holds a lock on its temporary file
(``flock``; a killed process's lock dies with it), so a save never removes another's live file.

``load`` checks the header against the optimizer, then each member's declared sizes (the zip entry's
and the ``.npy`` header's) against the param it belongs to before it reads that member's data, one
member at a time: a file cannot make it allocate more than the optimizer's own state. It touches
the optimizer only once everything is read, through ``optimizer.load_state_dict``, which validates
again before mutating anything.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import stat
import warnings
import zipfile
from typing import Any

import numpy as np

from gpuadam.arrays import describe
from gpuadam.hyper import check_count

try:
    import fcntl
except ImportError:  # Windows: a file another process has open cannot be deleted anyway
    fcntl = None

#: What this module calls of an optimizer (``gpuadam.optim.Optimizer``, which imports this module:
#: this one names no class above it): ``state_dict``, ``load_state_dict``, ``param_groups``,
#: ``state``, ``state_dtype`` and ``state_shape``.
Optimizer = Any

FORMAT = "gpuadam-checkpoint"
VERSION = 1

_HEADER = "header"
_STEPS = "steps"
_RESERVED = {"optimizer", "state", "param_groups"}  # state_dict keys with their own place in the file
_TEMP_DIGITS = 12  # hex digits of the random part of a temporary file's name
# what fsync of a directory raises where the filesystem or OS does not do it (nothing to make durable)
_NO_DIRECTORY_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


class _Invalid(Exception):
    """Internal: the file is not a valid checkpoint (turned into a ValueError naming the path)."""


class _Misfit(Exception):
    """Internal: a valid checkpoint that does not fit this optimizer's params."""


# --- save ---------------------------------------------------------------------------------------


def save(optimizer: Optimizer, path: str | os.PathLike[str]) -> None:
    """Write ``optimizer``'s state to exactly ``path`` (any suffix), atomically.

    Raises TypeError/ValueError, before touching the disk, if some state cannot be stored without
    pickle. An OSError means nothing was saved: any previous file at ``path`` is as it was, and no
    temporary file is left. Once the new file is renamed onto ``path`` the save has happened and
    ``save`` returns: if the directory's fsync then fails, a RuntimeWarning says the rename may not
    survive a power cut (silently where the filesystem does not fsync directories at all).
    """
    path = os.fspath(path)
    members = _encode(optimizer.state_dict())  # everything that can fail on content fails here
    directory = os.path.dirname(os.path.abspath(path))
    dir_fd = _open_directory(directory)  # can fail: before the rename, so the old file stays
    try:
        _remove_stale_temps(path)  # first: their space may be what this save needs
        _write_and_rename(members, path)
        _fsync_directory(dir_fd, directory, path)  # makes the rename itself durable
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _write_and_rename(members: dict[str, np.ndarray], path: str) -> None:
    """Write ``members`` to a new temporary file, fsync it and rename it onto ``path``; on any failure
    (KeyboardInterrupt too) remove the temporary file and re-raise, ``path`` untouched."""
    fd, tmp = _create_temp(path)
    f = os.fdopen(fd, "wb")
    try:
        _write_zip(f, members)
        f.flush()
        os.fsync(f.fileno())
        if fcntl is None:
            f.close()  # Windows cannot rename an open file (and has no lock to keep)
        os.replace(tmp, path)  # elsewhere while still locked: no other save takes it for stale
    except BaseException:
        _close_quietly(f)  # a full disk fails the close's flush too: the temp file must go anyway
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _close_quietly(f)  # the data was fsynced before the rename: a failed close loses nothing


def _close_quietly(f: Any) -> None:
    try:
        f.close()
    except OSError:
        pass


def _encode(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ``.npz`` members (name -> array) for a ``state_dict()``."""
    kind = state_dict.get("optimizer")
    if not isinstance(kind, str):
        raise TypeError(f"state_dict: expected the optimizer's class name under 'optimizer', got {kind!r}")
    state = state_dict["state"]
    count = len(state)
    steps = np.zeros(count, dtype=np.int64)
    members: dict[str, np.ndarray] = {}
    dtypes: list[dict[str, str]] = []
    for i in range(count):
        entry = state[i]
        try:
            steps[i] = check_count("step", entry.get("step"))  # the bound load_state_dict applies too
        except (TypeError, ValueError) as exc:
            raise ValueError(f"param {i}: cannot save: {exc}") from None
        names: dict[str, str] = {}
        for name, value in entry.items():
            if name == "step":
                continue
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"param {i}: cannot save state {name!r} of type {type(value).__name__}: "
                    "checkpoint.py stores host arrays and the step count only"
                )
            if value.dtype.hasobject or value.dtype.fields is not None:
                raise TypeError(f"param {i}: cannot save state {name!r} of dtype {value.dtype} without pickle")
            if "/" in name:
                raise ValueError(f"param {i}: cannot save state {name!r}: '/' separates member names")
            names[name] = value.dtype.name
            members[f"state/{i}/{name}"] = _storable(value)
        dtypes.append(names)
    groups = []
    for gi, group in enumerate(state_dict["param_groups"]):
        groups.append({key: _jsonable(f"param group {gi}: hyperparameter {key!r}", v) for key, v in group.items()})
    extra = {
        key: _jsonable(f"state_dict entry {key!r}", value)
        for key, value in state_dict.items()
        if key not in _RESERVED
    }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": kind,
        "param_groups": groups,
        "state": dtypes,
        "extra": extra,
    }
    text = json.dumps(header, allow_nan=False, separators=(",", ":"))
    members[_HEADER] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    members[_STEPS] = steps
    return members


def _storable(value: np.ndarray) -> np.ndarray:
    # .npy writes a user-defined dtype (ml_dtypes.bfloat16) as raw void bytes: store the bits as
    # unsigned integers instead; the dtype name in the header views them back.
    if value.dtype.isbuiltin == 2:
        return np.ascontiguousarray(value).view(np.dtype(f"u{value.dtype.itemsize}"))
    return value


def _jsonable(what: str, value: Any) -> Any:
    """``value`` as plain JSON data (tuples and arrays become lists, NumPy scalars Python ones), or a
    TypeError."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        value = value.tolist()  # a 0-d lr array, a betas array: the numbers they hold
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: cannot save the non-finite value {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(what, v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(what, v) for k, v in value.items()}
    raise TypeError(f"{what}: cannot save a value of type {type(value).__name__} without pickle")


def _create_temp(path: str) -> tuple[int, str]:
    """A new file next to ``path`` (same filesystem, so the rename is atomic), open for writing and
    locked, so that another save to ``path`` does not take it for a killed save's leftover."""
    head, tail = os.path.split(path)
    try:
        # keep the mode of the file we replace (a 0600 checkpoint stays private)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(head, f"{tail}.{secrets.token_hex(_TEMP_DIGITS // 2)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # 0o666 & ~umask, as open() would create it
        except FileExistsError:
            continue
        # Between the create and the lock another save may have found the file unlocked and
        # removed it: then this fd is no longer the file at ``tmp``, and we start over.
        if _try_lock(fd) is not False and _is_file_at(fd, tmp):
            break
        os.close(fd)
    if mode is not None and hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    return fd, tmp


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive lock on ``fd`` without waiting: True if taken, False if another open file
    holds it, None where locks cannot tell (no ``flock``, or a filesystem that refuses it)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _is_file_at(fd: int, name: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(name, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _remove_stale_temps(path: str) -> None:
    """Remove the temporary files that killed saves to ``path`` left: names ``<name>.<12 hex>.tmp``
    for exactly this ``<name>``, regular files that no live save holds locked. Nothing else."""
    head, tail = os.path.split(path)
    pattern = re.compile(re.escape(tail) + rf"\.[0-9a-f]{{{_TEMP_DIGITS}}}\.tmp")
    try:
        names = os.listdir(head or ".")
    except OSError:
        return  # the save itself will say what is wrong with the directory
    for name in names:
        if not pattern.fullmatch(name):
            continue
        stale = os.path.join(head, name)
        try:
            if not stat.S_ISREG(os.lstat(stale).st_mode):
                continue
            # O_NONBLOCK: a FIFO swapped in under this name must not hang the save
            fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            locked = _try_lock(fd)
            # Locked by a live save: keep. Locks refused by the filesystem: we cannot tell, keep.
            # No locks at all (Windows): a live save's file is open there, and deleting it fails.
            if locked is False or (locked is None and fcntl is not None):
                continue
            if stat.S_ISREG(os.fstat(fd).st_mode) and _is_file_at(fd, stale):
                os.unlink(stale)
        except OSError:
            pass
        finally:
            os.close(fd)


def _write_zip(f: Any, members: dict[str, np.ndarray]) -> None:
    # What np.savez writes (stored, zip64 on), but with allow_pickle=False on every member.
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in members.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                _write_array(member, array)


def _write_array(f: Any, array: np.ndarray) -> None:
    np.lib.format.write_array(f, array, allow_pickle=False)


def _open_directory(directory: str) -> int | None:
    if os.name == "nt":  # directories cannot be opened, and NTFS renames are journaled
        return None
    return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_directory(fd: int | None, directory: str, path: str) -> None:
    """fsync the directory after the rename. The new file is in place by now: a failure here is not
    a failed save (raising would say the old file is intact, and it is gone), only a weaker one."""
    if fd is None:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            warnings.warn(
                f"checkpoint {path!r} was saved, but fsync of its directory {directory!r} failed ({exc}): "
                "the rename may not survive a power cut", RuntimeWarning, stacklevel=3,
            )


# --- load ---------------------------------------------------------------------------------------


def load(optimizer: Optimizer, path: str | os.PathLike[str]) -> None:
    """Restore ``optimizer`` from a checkpoint written by ``save``.

    A truncated or corrupt file raises ValueError "...is not a valid gpuadam checkpoint: <why>"; a
    valid one that does not fit (optimizer kind, param count, groups, shapes, dtypes, state names)
    raises ValueError "...does not fit this optimizer: <what>". Either way the optimizer is unchanged.
    A missing file raises the OSError that opening it raises.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            header, steps, arrays = _read(f, optimizer)
        except _Invalid as exc:
            raise ValueError(f"{path!r} is not a valid gpuadam checkpoint: {exc}") from None
        except _Misfit as exc:
            raise ValueError(f"checkpoint {path!r} does not fit this optimizer: {exc}") from None
    state_dict = _state_dict(header, {i: {"step": int(steps[i]), **arrays[i]} for i in range(len(arrays))})
    try:
        optimizer.load_state_dict(state_dict)  # validates everything again before mutating
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path!r} does not fit this optimizer: {exc}") from exc


def _tuples(value: Any) -> Any:
    # JSON has no tuples; hyperparameter sequences (betas) are tuples, as the constructors make them.
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _read(f: Any, optimizer: Optimizer) -> tuple[dict[str, Any], np.ndarray, list[dict[str, np.ndarray]]]:
    """Header, steps and per-param state arrays of an open checkpoint file; ``_Invalid`` if it is not a
    valid checkpoint, ``_Misfit`` as soon as the header or a member's shape shows it does not fit."""
    size = os.fstat(f.fileno()).st_size
    params = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        zf = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise _Invalid(f"not a zip archive, or a truncated one ({exc})") from None
    with zf:
        names = zf.namelist()
        if len(set(names)) != len(names):
            raise _Invalid("the archive holds duplicate members")
        present = set(names)
        if _HEADER + ".npy" not in present:
            raise _Invalid(f"no {_HEADER!r} member (members: {sorted(present)[:5]})")
        # A stored header is at most the file's size; a compressed one gets room for its JSON's
        # worth per param, and no more: its declared size is checked before it is inflated.
        budget = max(size, 2**20 + 1024 * len(params))
        raw = _read_member(zf, _HEADER, np.dtype(np.uint8), None, budget=budget)
        header = _parse_header(raw)
        count = len(header["state"])
        expected = {_HEADER + ".npy", _STEPS + ".npy"}
        for i, names_i in enumerate(header["state"]):
            expected.update(f"state/{i}/{name}.npy" for name in names_i)
        if present != expected:
            missing, unexpected = sorted(expected - present), sorted(present - expected)
            raise _Invalid(f"members do not match the header: missing {missing[:5]}, unexpected {unexpected[:5]}")
        _check_fit(optimizer, params, header)  # before any member's data is read
        steps = _read_member(zf, _STEPS, np.dtype(np.int64), (count,))
        if np.any(steps < 0):
            raise _Invalid(f"negative step count {int(steps.min())}")
        arrays = []
        for i, names_i in enumerate(header["state"]):
            arrays.append({name: _read_member(zf, f"state/{i}/{name}", dtype, optimizer.state_shape(i, name), param=i)
                           for name, dtype in names_i.items()})
    return header, steps, arrays


def _read_member(
    zf: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple | None, *, budget: int = 0,
    param: int | None = None,
) -> np.ndarray:
    """One ``.npy`` member, checked against ``dtype`` and ``shape``, its CRC verified, as a new array.

    Its data is read only once its sizes are known to agree: the zip entry's declared size with the
    ``.npy`` header's shape, and that shape with ``shape`` (the param's, for a state member of
    ``param``: a ``_Misfit`` if not) or, without ``shape``, its size with ``budget``. Only the data a
    member must hold is ever allocated or inflated.
    """
    stored = np.dtype(f"u{dtype.itemsize}") if dtype.isbuiltin == 2 else dtype
    try:
        declared = zf.getinfo(name + ".npy").file_size
        if shape is None and declared > budget:
            raise _Invalid(f"member {name!r}: declares {declared} bytes, more than the {budget} it may hold")
        with zf.open(name + ".npy") as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise _Invalid(f"member {name!r}: unsupported .npy version {version}")
            if got_dtype != stored or fortran:
                raise _Invalid(f"member {name!r}: expected a C-ordered {stored} array, got {got_dtype}")
            nbytes = math.prod(got_shape) * stored.itemsize
            if nbytes != declared - member.tell():  # a .npy member is its header, then exactly its data
                raise _Invalid(f"member {name!r}: its header says {nbytes} bytes of data, the zip entry "
                               f"declares {declared - member.tell()}")
            if shape is not None and tuple(got_shape) != shape:
                if param is not None:
                    state = name.rsplit("/", 1)[-1]
                    raise _Misfit(f"param {param}: state {state!r} has shape {tuple(got_shape)}, the param's "
                                  f"shape is {shape}")
                raise _Invalid(f"member {name!r}: expected shape {shape}, got {tuple(got_shape)}")
            data = bytearray(nbytes)  # writable: the arrays are handed on, not views of a bytes object
            got = member.readinto(data)
            if got != nbytes or member.read(1):  # reading to the end makes zipfile check the CRC
                raise _Invalid(f"member {name!r}: holds other than the {nbytes} data bytes its header says")
    except (_Invalid, _Misfit):
        raise
    except (
        zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, SyntaxError, TypeError,
        RuntimeError, NotImplementedError,  # encrypted or compressed with an unsupported method
    ) as exc:
        # Bad CRC-32, truncated member, malformed .npy header, ...
        raise _Invalid(f"member {name!r}: {type(exc).__name__}: {exc}") from None
    array = np.frombuffer(data, dtype=stored).reshape(got_shape)
    return array.view(dtype) if stored != dtype else array


def _parse_header(raw: np.ndarray) -> dict[str, Any]:
    """The header's JSON, checked field by field."""
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Invalid(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise _Invalid(f"header format is {got!r}, expected {FORMAT!r}")
    version = header.get("version")
    if version != VERSION:
        raise _Invalid(f"format version {version!r}, this gpuadam reads version {VERSION}")
    missing = {"optimizer", "param_groups", "state", "extra"} - set(header)
    if missing:
        raise _Invalid(f"header lacks {sorted(missing)}")
    if not isinstance(header["optimizer"], str):
        raise _Invalid(f"header 'optimizer' is {header['optimizer']!r}, expected a class name")
    if not isinstance(header["extra"], dict) or _RESERVED & set(header["extra"]):
        raise _Invalid("header 'extra' must be a dict without the reserved keys")
    state = header["state"]
    if not isinstance(state, list):
        raise _Invalid("header 'state' must be a list")
    for i, names in enumerate(state):
        if not isinstance(names, dict):
            raise _Invalid(f"header 'state' entry {i} must be a dict of state name -> dtype")
        try:
            state[i] = {str(name): _dtype(dtype) for name, dtype in names.items()}
        except (TypeError, ValueError) as exc:
            raise _Invalid(f"header 'state' entry {i}: {exc}") from None
    groups = header["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise _Invalid("header 'param_groups' must be a list of dicts")
    indices = []
    for gi, group in enumerate(groups):
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in params):
            raise _Invalid(f"param group {gi}: 'params' must be a list of param indices")
        indices.extend(params)
    if indices != list(range(len(state))):
        raise _Invalid(f"param groups hold param indices {indices[:8]}, expected 0..{len(state) - 1} in order")
    return header


def _dtype(name: Any) -> np.dtype:
    if not isinstance(name, str):
        raise TypeError(f"dtype must be a name, got {name!r}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        try:  # bfloat16 & co. are known to NumPy only once ml_dtypes is imported
            import ml_dtypes

            dtype = np.dtype(getattr(ml_dtypes, name))
        except (ImportError, AttributeError, TypeError):
            raise ValueError(f"unknown dtype {name!r}") from None
    if dtype.hasobject or dtype.fields is not None or (dtype.kind not in "biufc" and dtype.isbuiltin != 2):
        raise ValueError(f"dtype {name!r} is not a numeric dtype")
    return dtype


def _check_fit(optimizer: Optimizer, params: list, header: dict[str, Any]) -> None:
    """``_Misfit`` naming the first way the checkpoint does not fit ``optimizer``, from its header
    alone: ``optimizer.check_state_dict`` on the state dict the file describes, every state array a
    zero-byte stand-in of the dtype the header names and the param's shape (each member's shape is
    checked from its own ``.npy`` header as it is read)."""
    if len(header["state"]) != len(params):  # before a stand-in is made per saved param
        raise _Misfit(f"it holds state for {len(header['state'])} params, this optimizer has {len(params)}")
    stand_ins = {
        i: {"step": 0, **{name: np.broadcast_to(np.zeros((), dtype), optimizer.state_shape(i, name))
                          for name, dtype in names.items()}}
        for i, (p, names) in enumerate(zip(params, header["state"]))
    }
    try:
        optimizer.check_state_dict(_state_dict(header, stand_ins))
    except (TypeError, ValueError) as exc:
        raise _Misfit(str(exc).removeprefix("state_dict: ")) from None


def _state_dict(header: dict[str, Any], state: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The ``state_dict()`` a checkpoint's header and ``state`` (per param: step and arrays) make."""
    return {
        **header["extra"],
        "optimizer": header["optimizer"],
        "param_groups": [{k: v if k == "params" else _tuples(v) for k, v in g.items()} for g in header["param_groups"]],
        "state": state,
    }


def _shape(x: Any) -> tuple:
    info = describe(x)
    return tuple(info.shape) if info is not None else tuple(x.shape)

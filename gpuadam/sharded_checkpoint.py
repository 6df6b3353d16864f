"""Sharded checkpoints: a directory of one file per rank and a manifest, readable at any rank count.

Layout of ``<directory>/``:

- ``manifest.json``: UTF-8 JSON: ``format``, ``version``, ``optimizer`` (class name),
  ``param_groups`` (one group: every hyperparameter, and the indices of all tensors), ``shapes``,
  ``offsets`` and ``size`` of the FlatBuffer the state belongs to, its ``dtype``, ``ranks`` and
  ``length`` (the slice length: rank ``r`` owns ``[r * length, (r + 1) * length)`` cut at
  ``size``), ``state`` (state name -> dtype name), ``step``, ``extra`` (``rounding_counter``,
  ``steps_skipped``) and ``files`` (per rank: ``name``, ``start``, ``stop``);
- ``rank-RRRRR-of-NNNNN.npz``: a zip of ``.npy`` members ``state/<name>``, each the
  ``stop - start`` elements of that state over the rank's slice of the flat buffer (bfloat16
  stored as uint16, as in ``gpuadam.checkpoint``).

Writing one (every rank at once) is ``gpuadam.distributed``'s business; this module holds the
format: the file writer and the validated readers, and ``load`` for an ordinary optimizer over
the views of a FlatBuffer of the same layout. A manifest is checked field by field, then each
member's declared sizes against the slice it must hold before its data is read (as
``gpuadam.checkpoint`` reads its files); a checkpoint that does not fit is refused before the
optimizer changes.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

from gpuadam import checkpoint
from gpuadam.arrays import describe
from gpuadam.flat import ALIGN

FORMAT = "gpuadam-sharded-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_MANIFEST_BUDGET = 2**26  # bytes: a manifest lists shapes and files, never data

Optimizer = Any  # gpuadam.optim.Optimizer, which imports this module


def rank_file(rank: int, ranks: int) -> str:
    return f"rank-{rank:05d}-of-{ranks:05d}.npz"


def flat_offsets(shapes: list[tuple[int, ...]]) -> tuple[list[int], int]:
    """Each tensor's offset in a FlatBuffer of ``shapes``, and its size (FlatBuffer's rule)."""
    offsets, end = [], 0
    for shape in shapes:
        offsets.append(end)
        end += -(-int(np.prod(shape)) // ALIGN) * ALIGN
    return offsets, end


def write_rank_file(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write one rank's slice of the state to the new file ``path`` and fsync it."""
    members = {f"state/{name}": checkpoint._storable(np.ascontiguousarray(a)) for name, a in arrays.items()}
    with open(path, "xb") as f:
        checkpoint._write_zip(f, members)
        f.flush()
        os.fsync(f.fileno())


def write_manifest(path: str, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, allow_nan=False, separators=(",", ":"))
    with open(path, "x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _invalid(directory: str, why: str) -> ValueError:
    return ValueError(f"{directory!r} is not a valid gpuadam sharded checkpoint: {why}")


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of ``directory``, checked field by field (ValueError naming what is wrong)."""
    path = os.path.join(directory, MANIFEST)
    with open(path, "rb") as f:
        raw = f.read(_MANIFEST_BUDGET + 1)
    if len(raw) > _MANIFEST_BUDGET:
        raise _invalid(directory, f"{MANIFEST} is larger than {_MANIFEST_BUDGET} bytes")
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(directory, f"{MANIFEST} is not UTF-8 JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _invalid(directory, f"format is {m.get('format') if isinstance(m, dict) else type(m).__name__!r}, "
                                  f"expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise _invalid(directory, f"format version {m.get('version')!r}, this gpuadam reads version {VERSION}")
    need = {"optimizer", "param_groups", "shapes", "offsets", "size", "dtype", "ranks", "length", "state", "step",
            "extra", "files"}
    if need - set(m):
        raise _invalid(directory, f"the manifest lacks {sorted(need - set(m))}")

    def count(name: str, low: int = 0) -> int:
        v = m[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise _invalid(directory, f"{name!r} is {v!r}, expected an integer >= {low}")
        return v

    size, ranks, length = count("size"), count("ranks", 1), count("length", ALIGN)
    count("step")
    if length % ALIGN or ranks * length < size:
        raise _invalid(directory, f"{ranks} slices of {length} elements do not cut a buffer of {size}")
    shapes = m["shapes"]
    if not isinstance(shapes, list) or not shapes or not all(
            isinstance(s, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in s)
            for s in shapes):
        raise _invalid(directory, "'shapes' must be a non-empty list of shapes")
    m["shapes"] = [tuple(s) for s in shapes]
    offsets, end = flat_offsets(m["shapes"])
    if m["offsets"] != offsets or size != end:
        raise _invalid(directory, "'offsets'/'size' are not a FlatBuffer's of 'shapes'")
    try:
        m["dtype"] = checkpoint._dtype(m["dtype"])
        if not isinstance(m["state"], dict):
            raise TypeError("'state' must be a dict of state name -> dtype")
        m["state"] = {str(n): checkpoint._dtype(d) for n, d in m["state"].items()}
    except (TypeError, ValueError) as exc:
        raise _invalid(directory, str(exc)) from None
    if any("/" in n for n in m["state"]):
        raise _invalid(directory, "a state name holds '/'")
    groups = m["param_groups"]
    if (not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict)
            or groups[0].get("params") != list(range(len(shapes)))):
        raise _invalid(directory, "'param_groups' must be one group over every tensor")
    if not isinstance(m["extra"], dict) or not isinstance(m["optimizer"], str):
        raise _invalid(directory, "'extra' must be a dict and 'optimizer' a class name")
    files = m["files"]
    expected = []
    for r in range(ranks):
        start = min(r * length, size)
        expected.append({"name": rank_file(r, ranks), "start": start, "stop": min(start + length, size)})
    if files != expected:
        raise _invalid(directory, f"'files' are not the {ranks} slices of {length} elements of {size}")
    present = set(os.listdir(directory))
    missing = {f["name"] for f in files} - present
    if missing:
        raise _invalid(directory, f"missing rank files {sorted(missing)[:4]}")
    return m


def read_range(directory: str, manifest: dict[str, Any], start: int, stop: int) -> dict[str, np.ndarray]:
    """Every state array over elements ``[start, stop)`` of the flat buffer, read from the rank files
    that hold them (only those), each member's sizes checked before its data is read."""
    out = {name: np.zeros(stop - start, dtype) for name, dtype in manifest["state"].items()}
    for entry in manifest["files"]:
        lo, hi = max(start, entry["start"]), min(stop, entry["stop"])
        if lo >= hi:
            continue
        path = os.path.join(directory, entry["name"])
        n = entry["stop"] - entry["start"]
        with open(path, "rb") as f:
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
                raise _invalid(directory, f"{entry['name']}: not a zip archive, or a truncated one ({exc})") from None
            with zf:
                names = zf.namelist()
                want = {f"state/{name}.npy" for name in manifest["state"]}
                if len(names) != len(set(names)) or set(names) != want:
                    raise _invalid(directory, f"{entry['name']}: members {sorted(names)[:5]}, expected "
                                              f"{sorted(want)[:5]}")
                for name, dtype in manifest["state"].items():
                    try:
                        a = checkpoint._read_member(zf, f"state/{name}", dtype, (n,))
                    except (checkpoint._Invalid, checkpoint._Misfit) as exc:
                        raise _invalid(directory, f"{entry['name']}: {exc}") from None
                    out[name][lo - start : hi - start] = a[lo - entry["start"] : hi - entry["start"]]
    return out


def header(manifest: dict[str, Any], n_params: int) -> dict[str, Any]:
    """The ``gpuadam.checkpoint`` header that a plain optimizer over the tensors would have saved."""
    return {"optimizer": manifest["optimizer"], "param_groups": manifest["param_groups"],
            "state": [{n: d for n, d in manifest["state"].items()} for _ in range(n_params)],
            "extra": manifest["extra"]}


def load(optimizer: Optimizer, directory: str) -> None:
    """Restore an ordinary optimizer over the views of a FlatBuffer (same shapes and dtype as the
    saved one) from a sharded checkpoint; refused, changing nothing, when it does not fit."""
    manifest = read_manifest(directory)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    shapes = [tuple(describe(p).shape) for p in params]
    if shapes != manifest["shapes"]:
        raise ValueError(f"checkpoint {directory!r} does not fit this optimizer: it holds the state of tensors of "
                         f"shapes {manifest['shapes'][:4]}..., this optimizer's params have {shapes[:4]}...")
    head = header(manifest, len(params))
    try:
        checkpoint._check_fit(optimizer, params, head)
    except checkpoint._Misfit as exc:
        raise ValueError(f"checkpoint {directory!r} does not fit this optimizer: {exc}") from None
    whole = read_range(directory, manifest, 0, manifest["size"])
    state = {}
    for i, (offset, shape) in enumerate(zip(manifest["offsets"], shapes)):
        size = int(np.prod(shape))
        state[i] = {"step": manifest["step"],
                    **{n: a[offset : offset + size].reshape(shape).copy() for n, a in whole.items()}}
    try:
        optimizer.load_state_dict(checkpoint._state_dict(head, state))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {directory!r} does not fit this optimizer: {exc}") from exc

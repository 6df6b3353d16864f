"""Saving and loading a ShardedOptimizer: every rank at once, agreeing on success before anything
changes (the format is ``gpuadam.sharded_checkpoint``'s).

A save writes ``<directory>.partial`` (rank 0 makes it, each rank writes its file, rank 0 the
manifest last), fsyncs it and renames it to ``<directory>``: the directory appears complete or not
at all. All ranks must see one filesystem. A killed save leaves ``<directory>.partial``, which the
next save to ``directory`` removes. A load validates on every rank and changes nothing anywhere
unless every rank's part fits.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from gpuadam import checkpoint, sharded_checkpoint
from gpuadam.flat import FlatBuffer

ShardedOptimizer = Any  # gpuadam.distributed.sharded.ShardedOptimizer, which imports this module


def _agree(opt: ShardedOptimizer, error: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed: this rank's own error, or one naming the others'."""
    failed = opt.comm.sum_host(np.array([error is not None], np.float64))[0]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on {int(failed)} other rank(s) (their errors say why)")


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:
        pass  # a filesystem that does not fsync directories: nothing more to make durable
    finally:
        os.close(fd)


def save(opt: ShardedOptimizer, directory: str) -> None:
    comm, layout = opt.comm, opt.layout
    directory = os.path.abspath(directory)
    partial = directory + ".partial"
    error: BaseException | None = None
    try:
        sd = opt.optimizer.state_dict()
        start, stop = opt._start, opt._stop
        arrays = {n: a[: stop - start] for n, a in sd["state"][0].items() if n != "step"}
        if comm.rank == 0:
            manifest = _manifest(opt, sd)
        if os.path.lexists(directory):
            raise FileExistsError(f"{directory!r} exists: a sharded checkpoint is saved to a new directory")
    except (OSError, TypeError, ValueError) as exc:
        error = exc
    _agree(opt, error, "save")
    if comm.rank == 0:
        try:
            if os.path.lexists(partial):
                shutil.rmtree(partial)  # a killed save's leftover
            os.mkdir(partial)
        except OSError as exc:
            error = exc
    _agree(opt, error, "save")
    try:
        sharded_checkpoint.write_rank_file(
            os.path.join(partial, sharded_checkpoint.rank_file(comm.rank, layout.ranks)), arrays)
    except OSError as exc:
        error = exc
    _agree(opt, error, "save")
    if comm.rank == 0:
        try:
            sharded_checkpoint.write_manifest(os.path.join(partial, sharded_checkpoint.MANIFEST), manifest)
            _fsync_directory(partial)
            if os.path.lexists(directory):
                raise FileExistsError(f"{directory!r} appeared while saving")
            os.rename(partial, directory)
            _fsync_directory(os.path.dirname(directory))
        except OSError as exc:
            error = exc
            shutil.rmtree(partial, ignore_errors=True)
    _agree(opt, error, "save")


def _manifest(opt: ShardedOptimizer, sd: dict[str, Any]) -> dict[str, Any]:
    params, layout = opt.params, opt.layout
    group = sd["param_groups"][0]
    hyper = {k: checkpoint._jsonable(f"hyperparameter {k!r}", v) for k, v in group.items() if k != "params"}
    state = sd["state"][0]
    return {
        "format": sharded_checkpoint.FORMAT,
        "version": sharded_checkpoint.VERSION,
        "optimizer": sd["optimizer"],
        "param_groups": [{**hyper, "params": list(range(len(params.shapes)))}],
        "shapes": [list(s) for s in params.shapes],
        "offsets": list(params.offsets),
        "size": params.size,
        "dtype": params.dtype.name,
        "ranks": layout.ranks,
        "length": layout.length,
        "state": {n: a.dtype.name for n, a in state.items() if n != "step"},
        "step": int(state["step"]),
        "extra": {k: checkpoint._jsonable(k, v) for k, v in sd.items() if k not in ("optimizer", "state",
                                                                                      "param_groups")},
        "files": [{"name": sharded_checkpoint.rank_file(r, layout.ranks), "start": a, "stop": b}
                  for r, (a, b) in enumerate(map(layout.bounds, range(layout.ranks)))],
    }


def load(opt: ShardedOptimizer, path: str) -> None:
    error: BaseException | None = None
    state_dict = None
    try:
        state_dict = _checked(opt, path)
    except (OSError, TypeError, ValueError) as exc:
        error = exc
    _agree(opt, error, "load")
    opt.optimizer.load_state_dict(state_dict)


def _checked(opt: ShardedOptimizer, path: str) -> dict[str, Any]:
    """The inner optimizer's state dict for this rank's slice, read from ``path`` and checked."""
    start, stop = opt._start, opt._stop
    current = opt.optimizer.state_dict()
    if os.path.isdir(path):
        m = sharded_checkpoint.read_manifest(path)
        if m["shapes"] != list(opt.params.shapes) or m["dtype"] != opt.params.dtype:
            raise ValueError(f"checkpoint {path!r} does not fit this optimizer: it holds the state of a FlatBuffer of "
                             f"{len(m['shapes'])} tensors of {m['dtype']}, the params are {opt.params!r} with "
                             "other shapes or dtype")
        inner = {"optimizer": m["optimizer"],
                 "param_groups": [{**{k: checkpoint._tuples(v) for k, v in m["param_groups"][0].items()},
                                   "params": [0]}],
                 **m["extra"]}
        # the names and dtypes first, on stand-ins: nothing is read for a checkpoint that cannot fit
        stand_ins = {n: np.broadcast_to(np.zeros((), d), (opt.layout.length,)) for n, d in m["state"].items()}
        opt.optimizer.check_state_dict({**inner, "state": {0: {"step": m["step"], **stand_ins}}})
        loaded = sharded_checkpoint.read_range(path, m, start, stop)
        step = m["step"]
    else:
        inner, loaded, step = _from_plain(opt, path, start, stop)
    state = {}
    for name, a in current["state"][0].items():
        if name == "step":
            continue
        if name not in loaded:
            raise ValueError(f"checkpoint {path!r} does not fit this optimizer: it lacks state {name!r}")
        a = a.copy()  # the padding past the buffer keeps its start values
        a[: stop - start] = loaded[name]
        state[name] = a
    state_dict = {**inner, "state": {0: {"step": step, **state}}}
    opt.optimizer.check_state_dict(state_dict)
    return state_dict


def _from_plain(opt: ShardedOptimizer, path: str, start: int, stop: int) -> tuple[dict, dict, int]:
    """A plain optimizer's checkpoint file of the same params: read into a host optimizer of the
    whole buffer (for a moment, the whole state on each rank), then cut to this rank's slice."""
    params = opt.params
    kwargs = {**opt._kwargs, "backend": "numba-cpu", "capturable": False}
    host = FlatBuffer(params.shapes, params.dtype)
    plain = type(opt.optimizer)(host.views, **kwargs)
    plain.load(path)
    sd = plain.state_dict()
    steps = {sd["state"][i]["step"] for i in sd["state"]}
    if len(steps) != 1 or len(sd["param_groups"]) != 1:
        raise ValueError(f"checkpoint {path!r} does not fit this optimizer: a sharded optimizer keeps one step "
                         f"count and one param group, the checkpoint has steps {sorted(steps)[:4]} and "
                         f"{len(sd['param_groups'])} groups")
    loaded = {}
    for name in sd["state"][0]:
        if name == "step":
            continue
        flat = np.zeros(stop - start, sd["state"][0][name].dtype)
        for i, (offset, shape) in enumerate(zip(params.offsets, params.shapes)):
            size = int(np.prod(shape))
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                flat[lo - start : hi - start] = sd["state"][i][name].reshape(-1)[lo - offset : hi - offset]
        loaded[name] = flat
    inner = {k: v for k, v in sd.items() if k != "state"}
    inner["param_groups"] = [{**{k: v for k, v in sd["param_groups"][0].items() if k != "params"}, "params": [0]}]
    return inner, loaded, steps.pop()

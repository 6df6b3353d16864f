"""Checkpoints: save/load/continue is bit-identical, the write is atomic, bad files change nothing."""

import copy
import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import problem

import gpuadam
from gpuadam import checkpoint

KW = dict(amsgrad=True, weight_decay=0.01, backend="numba-cpu")


def groups(params, lrs=(1e-2, 3e-3, 1e-3)):
    """Three param groups with different lrs (and decay) over 4 params."""
    return [
        {"params": params[:2], "lr": lrs[0]},
        {"params": params[2:3], "lr": lrs[1], "weight_decay": 0.1},
        {"params": params[3:], "lr": lrs[2]},
    ]


def trained(seed=0, steps=3, cls=gpuadam.Adam, dtype=np.float32, **kw):
    params, grads = problem(seed, dtype=dtype, steps=steps)
    opt = cls(groups(params), **{**KW, **kw})
    for g in grads:
        opt.step(g)
    return opt, params


def snapshot(opt, params):
    return {
        "params": [p.copy() for p in params],
        "state": [{k: v.copy() for k, v in s.items()} for s in opt.state],
        "steps": list(opt.steps),
        "hyper": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "members": [[id(p) for p in g["params"]] for g in opt.param_groups],
    }


def assert_same(a, b, same_optimizer=True):
    assert a["steps"] == b["steps"]
    assert a["hyper"] == b["hyper"]
    if same_optimizer:  # the groups still hold the very same param arrays
        assert a["members"] == b["members"]
    for x, y in zip(a["params"], b["params"], strict=True):
        np.testing.assert_array_equal(x, y)
    for s, t in zip(a["state"], b["state"], strict=True):
        assert s.keys() == t.keys()
        for k in s:
            np.testing.assert_array_equal(s[k], t[k])


# --- round trip ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_continue_is_bit_identical(tmp_path, dtype):
    steps, cut = 12, 5
    params0, grads = problem(4, dtype=dtype, steps=steps)
    straight = [p.copy() for p in params0]
    opt = gpuadam.Adam(groups(straight), **KW)
    for g in grads:
        opt.step(g)

    first_params = [p.copy() for p in params0]
    first = gpuadam.Adam(groups(first_params), **KW)
    for g in grads[:cut]:
        first.step(g)
    path = tmp_path / "opt.ckpt"
    checkpoint.save(first, path)

    # a new process: the model's params from its own checkpoint, an optimizer built with other lrs
    resumed = [p.copy() for p in first_params]
    second = gpuadam.Adam(groups(resumed, lrs=(0.5, 0.5, 0.5)), **KW)
    assert second.backend == "numba-cpu"
    checkpoint.load(second, path)
    assert [g["lr"] for g in second.param_groups] == [1e-2, 3e-3, 1e-3]
    assert second.param_groups[1]["weight_decay"] == 0.1
    assert second.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again, as the constructor makes it
    assert second.steps == [cut] * 4
    for g in grads[cut:]:
        second.step(g)
    assert_same(snapshot(opt, straight), snapshot(second, resumed), same_optimizer=False)


def test_file_is_a_plain_npz_without_pickle(tmp_path):
    opt, _ = trained()
    path = tmp_path / "opt.npz"
    checkpoint.save(opt, path)
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes())
        assert header["format"] == "gpuadam-checkpoint" and header["version"] == 1
        assert header["optimizer"] == "Adam"
        assert [g["lr"] for g in header["param_groups"]] == [1e-2, 3e-3, 1e-3]
        assert z["steps"].dtype == np.int64 and list(z["steps"]) == [3] * 4
        np.testing.assert_array_equal(z["state/2/max_exp_avg_sq"], opt.state_dict()["state"][2]["max_exp_avg_sq"])


@pytest.mark.parametrize("name", ["opt", "opt.ckpt", "opt.npz", "opt.v1.tar"])
def test_writes_exactly_the_path_given(tmp_path, name):
    opt, params = trained()
    checkpoint.save(opt, str(tmp_path / name))  # a str path: np.savez would have appended .npz
    assert os.listdir(tmp_path) == [name]
    fresh, _ = trained(seed=9, steps=1)
    checkpoint.load(fresh, tmp_path / name)
    assert fresh.steps == [3] * 4


def test_save_replaces_the_previous_file_and_keeps_its_mode(tmp_path):
    path = tmp_path / "opt.ckpt"
    opt, params = trained(steps=2)
    checkpoint.save(opt, path)
    os.chmod(path, 0o600)
    opt.step(problem(1)[1][0])
    checkpoint.save(opt, path)
    assert os.listdir(tmp_path) == ["opt.ckpt"]
    assert os.stat(path).st_mode & 0o777 == 0o600
    fresh, _ = trained(seed=9, steps=1)
    checkpoint.load(fresh, path)
    assert fresh.steps == [3] * 4


def test_plain_extra_entries_of_state_dict_survive(tmp_path, monkeypatch):
    """A future ``state_dict()`` entry like ``steps_skipped`` is stored without changing this module."""
    opt, _ = trained()
    base = opt.state_dict
    monkeypatch.setattr(opt, "state_dict", lambda: {**base(), "steps_skipped": np.int64(2)})
    checkpoint.save(opt, tmp_path / "c")
    fresh, _ = trained(seed=1, steps=1)
    seen = {}
    real = fresh.load_state_dict
    monkeypatch.setattr(fresh, "load_state_dict", lambda sd: (seen.update(sd), real(sd)))
    checkpoint.load(fresh, tmp_path / "c")
    assert seen["steps_skipped"] == 2 and fresh.steps == [3] * 4


# --- atomic write -------------------------------------------------------------------------------


def _fail_write_midway(monkeypatch, exc):
    """Make the third member's write put some bytes in the file, then fail like a full disk."""
    calls = []
    real = checkpoint._write_array

    def write(f, array):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"\x93NUMPY\x01\x00" + b"x" * 100)
            raise exc
        real(f, array)

    monkeypatch.setattr(checkpoint, "_write_array", write)


def _fail(monkeypatch, target, name, exc):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(target, name, fail)


CRASHES = {
    "disk-full-mid-write": lambda mp: _fail_write_midway(mp, OSError(errno.ENOSPC, "No space left on device")),
    "interrupt-mid-write": lambda mp: _fail_write_midway(mp, KeyboardInterrupt()),
    "fsync": lambda mp: _fail(mp, os, "fsync", OSError(errno.EIO, "Input/output error")),
    "rename": lambda mp: _fail(mp, os, "replace", OSError(errno.EIO, "Input/output error")),
}


@pytest.mark.parametrize("crash", CRASHES)
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, crash):
    path = tmp_path / "opt.ckpt"
    opt, params = trained(steps=2)
    checkpoint.save(opt, path)
    old = path.read_bytes()
    opt.step(problem(1)[1][0])
    with monkeypatch.context() as mp:
        CRASHES[crash](mp)
        with pytest.raises((OSError, KeyboardInterrupt)):
            checkpoint.save(opt, path)
    assert os.listdir(tmp_path) == ["opt.ckpt"]  # no temporary file left behind
    assert path.read_bytes() == old
    fresh, _ = trained(seed=9, steps=1)
    checkpoint.load(fresh, path)
    assert fresh.steps == [2] * 4


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    opt, _ = trained()
    _fail_write_midway(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError):
        checkpoint.save(opt, tmp_path / "opt.ckpt")
    assert os.listdir(tmp_path) == []


def test_unstorable_state_is_refused_before_touching_the_disk(tmp_path):
    path = tmp_path / "opt.ckpt"
    opt, _ = trained()
    checkpoint.save(opt, path)
    old = path.read_bytes()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="param group 0: hyperparameter 'lr'.*non-finite"):
        checkpoint.save(opt, path)
    opt.param_groups[0]["lr"] = object()
    with pytest.raises(TypeError, match="without pickle"):
        checkpoint.save(opt, path)
    assert os.listdir(tmp_path) == ["opt.ckpt"] and path.read_bytes() == old


# --- files that are not checkpoints -------------------------------------------------------------


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def _npy(array) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array(f, np.asarray(array), allow_pickle=True)
    return f.getvalue()


def _with_header(data: bytes, edit) -> bytes:
    members = _members(data)
    header = json.loads(np.lib.format.read_array(io.BytesIO(members["header.npy"])).tobytes())
    edit(header)
    members["header.npy"] = _npy(np.frombuffer(json.dumps(header).encode(), np.uint8))
    return _zip(members)


def _flip_middle(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes(b ^ 0xFF for b in data[i:i + 8]) + data[i + 8:]


def _huge_member(data: bytes) -> bytes:
    """An exp_avg member whose .npy header claims 4 TB (and holds 8 bytes)."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    members = _members(data)
    members["state/0/exp_avg.npy"] = f.getvalue() + bytes(8)
    return _zip(members)


def _replace(name, value):
    def change(data):
        members = _members(data)
        members[name] = _npy(value)
        return _zip(members)
    return change


def _rename(old, new):
    def change(data):
        members = _members(data)
        members[new] = members.pop(old)
        return _zip(members)
    return change


CORRUPT = {
    "empty": (lambda d: b"", "not a zip archive"),
    "first-100-bytes": (lambda d: d[:100], "not a zip archive"),
    "half": (lambda d: d[: len(d) // 2], "not a zip archive"),
    "last-byte-cut": (lambda d: d[:-1], "not a zip archive"),
    "end-record-cut": (lambda d: d[:-22], "not a zip archive"),
    "garbage": (lambda d: np.random.default_rng(0).bytes(len(d)), "not a zip archive"),
    "bytes-flipped-in-data": (_flip_middle, "CRC"),
    "member-renamed": (_rename("state/1/exp_avg.npy", "state/1/weights.npy"), "members do not match the header"),
    "extra-member": (lambda d: _zip({**_members(d), "evil.npy": _npy([1])}), "unexpected \\['evil.npy'\\]"),
    "no-header": (lambda d: _zip({k: v for k, v in _members(d).items() if k != "header.npy"}), "no 'header'"),
    "pickled-steps": (_replace("steps.npy", np.array([object()] * 4)), "'steps'.*expected a C-ordered int64"),
    "wrong-dtype-member": (_replace("state/0/exp_avg.npy", np.zeros((257, 3))), "expected a C-ordered float32"),
    "huge-member": (_huge_member, "header says 4000000000000 bytes"),
    "short-steps": (_replace("steps.npy", np.zeros(3, np.int64)), r"expected shape \(4,\)"),
    "negative-step": (_replace("steps.npy", np.array([1, 2, -3, 4])), "negative step"),
    "header-not-json": (_replace("header.npy", np.frombuffer(b"\xff{", np.uint8)), "not UTF-8 JSON"),
    "other-format": (lambda d: _with_header(d, lambda h: h.update(format="x")), "format is 'x'"),
    "newer-version": (lambda d: _with_header(d, lambda h: h.update(version=2)), "version 2"),
    "groups-skip-a-param": (
        lambda d: _with_header(d, lambda h: h["param_groups"][2].update(params=[2])), "param indices"
    ),
    "unknown-dtype": (
        lambda d: _with_header(d, lambda h: h["state"][0].update(exp_avg="float99")), "unknown dtype 'float99'"
    ),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_file_is_refused_and_optimizer_unchanged(tmp_path, case):
    change, reason = CORRUPT[case]
    source, _ = trained(seed=1)
    good = tmp_path / "good"
    checkpoint.save(source, good)
    bad = tmp_path / "bad"
    bad.write_bytes(change(good.read_bytes()))
    opt, params = trained(seed=2, steps=2)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="is not a valid gpuadam checkpoint") as info:
        checkpoint.load(opt, bad)
    assert "bad" in str(info.value)
    assert info.match(reason)
    assert_same(before, snapshot(opt, params))


def test_every_single_byte_corruption_is_refused_or_harmless(tmp_path):
    """Flip each byte of a small checkpoint, and cut it at each length: never a wrong or partial load."""
    shapes = [(5,), (2, 3)]
    params, grads = problem(3, shapes=shapes, steps=2)
    source = gpuadam.Adam(params, amsgrad=True, backend="numba-cpu")
    for g in grads:
        source.step(g)
    good = tmp_path / "good"
    checkpoint.save(source, good)
    data = good.read_bytes()
    expected = source.state_dict()
    target_params = [p.copy() for p in params]
    opt = gpuadam.Adam(target_params, amsgrad=True, lr=0.5, backend="numba-cpu")
    opt.step(grads[0])
    before = snapshot(opt, target_params)
    checkpoint.save(opt, tmp_path / "before")
    bad = tmp_path / "bad"
    variants = [data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:] for i in range(len(data))]
    variants += [data[:n] for n in range(0, len(data), 5)]
    loaded = 0
    for variant in variants:
        bad.write_bytes(variant)
        try:
            checkpoint.load(opt, bad)
        except ValueError:
            assert_same(before, snapshot(opt, target_params))
            continue
        # zip fields that nothing reads (timestamps, attributes) may change: the state must not
        loaded += 1
        got = opt.state_dict()
        assert got["param_groups"] == expected["param_groups"]
        for i, s in expected["state"].items():
            assert got["state"][i]["step"] == s["step"]
            for k in s:
                np.testing.assert_array_equal(got["state"][i][k], s[k])
        checkpoint.load(opt, tmp_path / "before")
    assert loaded < len(data) // 4, loaded  # almost every byte matters


# --- valid checkpoints that do not fit ----------------------------------------------------------


def _other_shapes(params):
    params = [p.copy() for p in params]
    params[2] = np.zeros((1000, 1), np.float32)
    return params


MISFITS = {
    "adamw-into-adam": (dict(cls=gpuadam.AdamW), dict(), "saved by AdamW, this optimizer is Adam"),
    "adam-into-adamw": (dict(), dict(cls=gpuadam.AdamW), "saved by Adam, this optimizer is AdamW"),
    "float64-into-float32": (dict(dtype=np.float64), dict(), "param 0: state 'exp_avg' has dtype float64"),
    "without-amsgrad": (dict(amsgrad=False), dict(), "param 0: it holds state \\['exp_avg', 'exp_avg_sq'\\]"),
    "with-amsgrad": (dict(), dict(amsgrad=False), "this optimizer allocated \\['exp_avg', 'exp_avg_sq'\\]"),
}


@pytest.mark.parametrize("case", MISFITS)
def test_checkpoint_of_another_optimizer_is_refused(tmp_path, case):
    saved_kw, target_kw, reason = MISFITS[case]
    source, _ = trained(seed=1, **saved_kw)
    checkpoint.save(source, tmp_path / "c")
    opt, params = trained(seed=2, steps=2, **target_kw)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="does not fit this optimizer") as info:
        checkpoint.load(opt, tmp_path / "c")
    assert info.match(reason)
    assert_same(before, snapshot(opt, params))


def _refused(tmp_path, source, opt, params, reason):
    checkpoint.save(source, tmp_path / "c")
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="does not fit this optimizer") as info:
        checkpoint.load(opt, tmp_path / "c")
    assert info.match(reason)
    assert_same(before, snapshot(opt, params))


def test_wrong_shapes_are_refused(tmp_path):
    source, _ = trained(seed=1)
    params, grads = problem(2, steps=2)
    params = _other_shapes(params)
    opt = gpuadam.Adam(groups(params), **KW)
    opt.step([np.ones_like(p) for p in params])
    reason = r"param 2: state 'exp_avg' has shape \(1000,\), the param's shape is \(1000, 1\)"
    _refused(tmp_path, source, opt, params, reason)


def test_wrong_param_count_is_refused(tmp_path):
    source, _ = trained(seed=1)
    params, grads = problem(2, shapes=[(257, 3), (1,), (1000,)], steps=1)
    opt = gpuadam.Adam([{"params": params[:2]}, {"params": params[2:]}], **KW)
    opt.step(grads[0])
    _refused(tmp_path, source, opt, params, "state for 4 params, this optimizer has 3")


def test_other_group_split_is_refused(tmp_path):
    source, _ = trained(seed=1)
    params, grads = problem(2, steps=1)
    opt = gpuadam.Adam([{"params": params[:1]}, {"params": params[1:]}], **KW)
    opt.step(grads[0])
    _refused(tmp_path, source, opt, params, r"3 param groups of sizes \[2, 1, 1\], this optimizer has 2")


def test_hyperparameters_the_optimizer_refuses_are_refused(tmp_path):
    source, _ = trained(seed=1)
    source.param_groups[1]["lr"] = -1.0  # stored as is: the optimizer's own validation refuses it
    opt, params = trained(seed=2, steps=2)
    _refused(tmp_path, source, opt, params, "param group 1: lr must be a finite number >= 0")


def test_missing_file_is_an_os_error(tmp_path):
    opt, _ = trained()
    with pytest.raises(FileNotFoundError):
        checkpoint.load(opt, tmp_path / "nothing")


# --- the directory fsync, after the rename ------------------------------------------------------


def _spy_directory_fds(monkeypatch):
    """Record the fds ``os.open`` gives for directories."""
    fds = []
    real = os.open

    def spy(path, flags, *args, **kwargs):
        fd = real(path, flags, *args, **kwargs)
        if os.path.isdir(path):
            fds.append(fd)
        return fd

    monkeypatch.setattr(os, "open", spy)
    return fds


@pytest.mark.skipif(os.name == "nt", reason="directories are not fsynced on Windows")
def test_directory_fsync_failing_after_the_rename_is_a_save_that_happened(tmp_path, monkeypatch):
    """The new file is in place: an OSError would claim the old one is intact. A warning says the
    rename may not be durable, except where the filesystem does not fsync directories at all."""
    path = tmp_path / "opt.ckpt"
    opt, params = trained(steps=2)
    checkpoint.save(opt, path)
    real_fsync = os.fsync
    for steps, (code, warns) in enumerate([(errno.EIO, True), (errno.EINVAL, False)], start=3):
        opt.step(problem(steps)[1][0])
        with monkeypatch.context() as mp:
            fds = _spy_directory_fds(mp)

            def fsync(fd, fds=fds, code=code):
                if fd in fds:
                    raise OSError(code, os.strerror(code))
                real_fsync(fd)

            mp.setattr(os, "fsync", fsync)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                checkpoint.save(opt, path)
            assert fds  # the directory was opened, and its fsync failed
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if warns:
            assert len(messages) == 1 and "was saved, but fsync of its directory" in messages[0], messages
        else:
            assert messages == []
        assert os.listdir(tmp_path) == ["opt.ckpt"]
        fresh, _ = trained(seed=9, steps=1)
        checkpoint.load(fresh, path)
        assert fresh.steps == [steps] * 4


@pytest.mark.skipif(os.name == "nt", reason="directories are not opened on Windows")
def test_directory_that_cannot_be_opened_fails_the_save_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "opt.ckpt"
    opt, params = trained(steps=2)
    checkpoint.save(opt, path)
    old = path.read_bytes()
    opt.step(problem(1)[1][0])
    real = os.open

    def refuse_directories(p, flags, *args, **kwargs):
        if os.path.isdir(p):
            raise PermissionError(errno.EACCES, "Permission denied", p)
        return real(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_directories)
    with pytest.raises(PermissionError):
        checkpoint.save(opt, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["opt.ckpt"] and path.read_bytes() == old


# --- temporary files a killed save left ---------------------------------------------------------

_KILLED_SAVE = """
import sys, time
import numpy as np
import gpuadam
from gpuadam import checkpoint

opt = gpuadam.Adam([np.ones((256, 1024), np.float32) for _ in range(3)], backend="numba-cpu")
real, written = checkpoint._write_array, []

def write(f, array):
    real(f, array)
    written.append(1)
    if len(written) == 3:  # some members are in the temporary file: tell the parent, and wait
        print("mid-save", flush=True)
        time.sleep(600)

checkpoint._write_array = write
checkpoint.save(opt, sys.argv[1])
"""

_TEMP = re.compile(r"opt\.ckpt\.[0-9a-f]{12}\.tmp")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_next_save_removes_the_temporary_file_of_a_killed_save_and_nothing_else(tmp_path):
    path = tmp_path / "opt.ckpt"
    opt, params = trained(steps=2)
    checkpoint.save(opt, path)
    old = path.read_bytes()
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(300, child.kill)  # a child that never gets mid-save ends the readline
    watchdog.start()
    try:
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        watchdog.cancel()
        child.kill()
        _, err = child.communicate(timeout=60)
    assert line == "mid-save\n", err[-3000:]
    killed = [n for n in os.listdir(tmp_path) if _TEMP.fullmatch(n)]
    assert len(killed) == 1 and os.path.getsize(tmp_path / killed[0]) > 2**20  # what kill -9 leaves
    assert path.read_bytes() == old

    (tmp_path / "opt.ckpt.00112233aabb.tmp").write_bytes(b"stale")  # another killed save's
    keep = ["opt.ckpt.0123456789ab.tmp.bak", "opt.ckpt.0123456789AB.tmp", "opt.ckpt.0123456789a.tmp",
            "opt.ckpt.0123456789abc.tmp", "other.ckpt.0123456789ab.tmp", "xopt.ckpt.0123456789ab.tmp",
            "optXckpt.0123456789ab.tmp", "opt.ckpt.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"not ours")
    (tmp_path / "opt.ckpt.abcdefabcdef.tmp").mkdir()  # the right name, but not a file we write
    keep.append("opt.ckpt.abcdefabcdef.tmp")
    fd, live = checkpoint._create_temp(str(path))  # a save in progress, holding its lock
    keep.append(os.path.basename(live))
    try:
        opt.step(problem(1)[1][0])
        checkpoint.save(opt, path)
        assert sorted(os.listdir(tmp_path)) == sorted(["opt.ckpt", *keep])
    finally:
        os.close(fd)
    fresh, _ = trained(seed=9, steps=1)
    checkpoint.load(fresh, path)
    assert fresh.steps == [3] * 4


# --- files that would make load allocate far more than the params need ----------------------------


def _deflated(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            # the header stored (it pads the file), every array deflated
            zf.writestr(name, data, compress_type=zipfile.ZIP_STORED if name == "header.npy" else zipfile.ZIP_DEFLATED)
    return out.getvalue()


def _peak_bytes_of_refused_load(opt, path, match):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            checkpoint.load(opt, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_many_deflated_members_are_refused_before_any_is_inflated(tmp_path):
    """~1.3 MB on disk, 192 MiB inflated: 64 params' state, each member (1 MiB) below the file's size."""
    source, _ = trained(seed=1)
    checkpoint.save(source, tmp_path / "good")
    members = _members((tmp_path / "good").read_bytes())
    header = json.loads(np.lib.format.read_array(io.BytesIO(members["header.npy"])).tobytes())
    count, names = 64, header["state"][0]
    header["param_groups"] = [{**header["param_groups"][0], "params": list(range(count))}]
    header["state"] = [names] * count
    text = json.dumps(header) + " " * 2**20  # JSON may end in spaces: a stored header pads the file
    bomb = {"header.npy": _npy(np.frombuffer(text.encode(), np.uint8)), "steps.npy": _npy(np.zeros(count, np.int64))}
    zeros = _npy(np.zeros((256, 1024), np.float32))  # 1 MiB inflated, 1 kB deflated
    bomb.update({f"state/{i}/{name}.npy": zeros for i in range(count) for name in names})
    path = tmp_path / "bomb"
    path.write_bytes(_deflated(bomb))
    assert path.stat().st_size < 2**21
    opt, params = trained(seed=2, steps=2)
    before = snapshot(opt, params)
    peak = _peak_bytes_of_refused_load(opt, path, "does not fit this optimizer: it holds state for 64 params, "
                                                  "this optimizer has 4")
    assert peak < 8 * 2**20, peak
    assert_same(before, snapshot(opt, params))


def _npy_then(array, trailing: int) -> bytes:
    return _npy(array) + bytes(trailing)


BOMBS = {
    # the .npy header tells the param's shape, the zip entry 32 MiB more
    "zip-size-above-npy": (lambda: _npy_then(np.zeros(1, np.float32), 2**25),
                           "not a valid.*'state/1/exp_avg': its header says 4 bytes of data, the zip entry declares "
                           f"{2**25 + 4}"),
    # both agree on 32 MiB, the param needs 4 bytes
    "npy-shape-above-param": (lambda: _npy(np.zeros((2048, 4096), np.float32)),
                              r"does not fit.*param 1: state 'exp_avg' has shape \(2048, 4096\), the param's "
                              r"shape is \(1,\)"),
}


@pytest.mark.parametrize("case", BOMBS)
def test_member_declaring_more_than_its_param_needs_is_refused_before_it_is_inflated(tmp_path, case):
    make, match = BOMBS[case]
    source, _ = trained(seed=1)
    checkpoint.save(source, tmp_path / "good")
    members = _members((tmp_path / "good").read_bytes())
    members["state/1/exp_avg.npy"] = make()
    path = tmp_path / "bomb"
    path.write_bytes(_deflated(members))
    opt, params = trained(seed=2, steps=2)
    before = snapshot(opt, params)
    assert _peak_bytes_of_refused_load(opt, path, match) < 4 * 2**20
    assert_same(before, snapshot(opt, params))


# --- steps_skipped ------------------------------------------------------------------------------


def test_steps_skipped_survives_state_dict_and_checkpoints(tmp_path):
    params0, grads = problem(5, steps=2)
    poisoned = [g.copy() for g in grads[1]]
    poisoned[2].flat[0] = np.nan

    def build():
        return gpuadam.Adam(groups([p.copy() for p in params0]), skip_nonfinite=True, **KW)

    opt = build()
    opt.step(grads[0])
    opt.step(poisoned)
    opt.step(poisoned)
    assert opt.steps_skipped == 2 and opt.state_dict()["steps_skipped"] == 2
    by_dict = build()
    by_dict.load_state_dict(opt.state_dict())
    checkpoint.save(opt, tmp_path / "c")
    by_file = build()
    by_file.load(tmp_path / "c")
    for resumed in (by_dict, by_file):
        assert resumed.steps_skipped == 2 and resumed.steps == [1] * 4
        resumed.step(poisoned)
        assert resumed.steps_skipped == 3
    older = opt.state_dict()
    del older["steps_skipped"]  # a state_dict from before it was saved: nothing was counted
    by_dict.load_state_dict(older)
    assert by_dict.steps_skipped == 0

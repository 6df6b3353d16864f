"""gpuadam.distributed: sharded optimizer state on loopback, under mpiexec (mpi4py with the mpich
wheel) and torch.distributed (gloo), and the in-process pieces (layout, hooks, one rank).

Each launch runs every check of ``distributed_worker.py`` in one set of processes (Numba's compile
per process is the cost; ``NUMBA_CACHE_DIR`` shares it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpuadam
from gpuadam.distributed import ShardedOptimizer, ShardLayout, communicator
from gpuadam.flat import ALIGN

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("NUMBA_NUM_THREADS", "1")  # N ranks on a few cores: one thread each
    return env


def _passed(directory: Path, out: str) -> list[str]:
    done = directory / "passed"
    assert done.exists(), f"the ranks did not all pass:\n{out[-6000:]}"
    return done.read_text().splitlines()


def _mpiexec() -> str:
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        pytest.skip("no mpiexec (pip install mpich)")
    return found


def test_mpi_four_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    proc = subprocess.run([mpiexec, "-n", "4", sys.executable, str(WORKER), "mpi", str(tmp_path)], env=_env(),
                          capture_output=True, text=True, timeout=240)
    passed = _passed(tmp_path, proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(passed) == 6 and "4 -> 2 -> 1 -> 3" in passed[-1]


def test_example_script_under_mpiexec():
    """scripts/train_sharded.py, shortened: two ranks train, the loss falls, the params agree."""
    pytest.importorskip("mpi4py")
    pytest.importorskip("sklearn")
    mpiexec = _mpiexec()
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, str(ROOT / "scripts" / "train_sharded.py"),
                           "--steps", "60"], env=_env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "params identical on all ranks: True" in out, out[-4000:]
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[1] < losses[0] / 2, out
    assert "2 rank(s)" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torch_gloo_two_ranks(tmp_path):
    pytest.importorskip("torch.distributed")
    n = 2  # 144 elements cut in slices of 80: the ragged tail (and [1]: a rank with nothing)
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "torch", str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    passed = _passed(tmp_path, "\n".join(outs))
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert len(passed) == 8 and "2 -> 1" in passed[-1]
    assert any("stochastic_rounding" in line for line in passed)
    assert any("flatten_parameters" in line for line in passed)


# --- in one process ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 48, 160, 1024])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7, 64])
def test_layout_cuts_equal_aligned_slices(size, ranks):
    layout = ShardLayout.of(size, ranks)
    assert layout.length % ALIGN == 0 and layout.length * ranks >= size
    assert layout.length < -(-size // ranks) + ALIGN  # no more padding than alignment needs
    counts = layout.counts()
    assert sum(counts) == size and all(0 <= c <= layout.length for c in counts)
    starts = [layout.bounds(r)[0] for r in range(ranks)]
    assert all(s % ALIGN == 0 for s in starts) and starts == sorted(starts)
    assert layout.even == (size == ranks * layout.length)


def test_one_rank_is_the_plain_optimizer_bit_for_bit():
    rng = np.random.default_rng(3)
    buf = gpuadam.FlatBuffer([(3, 5), 7])
    for v in buf.views:
        v[...] = rng.standard_normal(v.shape)
    ref = gpuadam.FlatBuffer.from_arrays(buf.views)
    opt = ShardedOptimizer(gpuadam.RAdam, buf, None, lr=1e-2)
    plain = gpuadam.RAdam(ref.views, lr=1e-2)
    g = buf.zeros_like()
    for _ in range(3):
        # padding included: the norm skips it in both (the params there move alike in both)
        g.data[...] = rng.standard_normal(g.size) * 10
        opt.step(g, max_grad_norm=1.0)
        plain.step(g.views, max_grad_norm=1.0)
        np.testing.assert_array_equal(buf.data, ref.data)
    assert opt.state_nbytes == 2 * buf.size * 4 and opt.steps == 3


def test_refusals_before_any_collective():
    buf = gpuadam.FlatBuffer([4])
    with pytest.raises(TypeError, match="FlatBuffer"):
        ShardedOptimizer(gpuadam.Adam, buf.views, None)
    with pytest.raises(TypeError, match="optimizer class"):
        ShardedOptimizer(object, buf, None)
    with pytest.raises(TypeError, match="mpi4py"):
        communicator(object())
    opt = ShardedOptimizer(gpuadam.Adam, buf, None)
    with pytest.raises(ValueError, match="layout"):
        opt.step(gpuadam.FlatBuffer([5]))
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(buf.zeros_like(), grad_scale=0.0)
    assert opt.steps == 0


def test_shard_hook_clips_by_the_reduced_norm_and_skips_on_the_reduced_flag():
    """The hook sees [sum of squares, non-finite count] and what it writes is what the step uses."""
    p = np.ones(8, np.float32)
    seen = []

    def other_slice(stats):
        seen.append(stats.copy())
        stats += [9.0, 0.0]  # another slice's sum of squares: the global norm is 5, not 4

    opt = gpuadam.SGD([p], lr=1.0)
    opt.shard(0, other_slice)
    opt.step([np.full(8, 1.414213562, np.float32)], max_grad_norm=1.0)  # this slice's norm ~4
    assert abs(seen[0][0] - 16.0) < 1e-5 and abs(opt.last_grad_norm - 5.0) < 1e-6
    np.testing.assert_allclose(p, 1.0 - 1.414213562 / 5.0, rtol=1e-5)
    skipper = gpuadam.Adam([q := np.ones(4, np.float32)], skip_nonfinite=True)
    skipper.shard(0, lambda stats: stats.__setitem__(1, stats[1] + 1))  # another slice saw a NaN
    skipper.step([np.ones(4, np.float32)])
    assert skipper.steps_skipped == 1 and skipper.steps == [0] and (q == 1).all()
    with pytest.raises(ValueError, match="index_base"):
        opt.shard(-1, other_slice)


def test_stochastic_rounding_draws_by_the_global_index():
    """A slice stepped with ``shard(index_base)`` rounds each element with the bits the whole
    buffer's step draws for it; without the base it would not."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    n, base = 4096, 1024
    rng = np.random.default_rng(5)
    p0 = np.ones(n, bf16)
    g = (rng.standard_normal(n) * 1e-3).astype(bf16)
    whole = p0.copy()
    gpuadam.SGD([whole], lr=2.0**-4, stochastic_rounding=True, seed=11).step([g])
    results = []
    for index_base in (base, 0):
        part = p0[base : base + 512].copy()
        opt = gpuadam.SGD([part], lr=2.0**-4, stochastic_rounding=True, seed=11)
        opt.shard(index_base, lambda stats: None)
        opt.step([g[base : base + 512]])
        results.append(part)
    np.testing.assert_array_equal(results[0].view(np.uint16), whole[base : base + 512].view(np.uint16))
    assert not np.array_equal(results[1].view(np.uint16), whole[base : base + 512].view(np.uint16))

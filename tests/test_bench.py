"""``gpuadam bench``: the JSON it writes, verification before timing, the ceiling's accounting, and
its GPU timing path in Numba's CUDA simulator (in a process of its own). No timing assertions."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gpuadam import bench
from gpuadam.cli import main as cli_main
from gpuadam.kernels.numba_cpu import PARALLEL_MIN

ROW_KEYS = {
    "suite": str, "optimizer": str, "dtype": str, "size": int, "tensors": int, "layout": str,
    "implementation": str, "group": str, "backend": str, "device": str, "launches": str, "status": str,
    "verified": bool, "buffer_sets": int, "steps_per_sample": int, "samples_s": list, "bytes_per_step": int,
}
TIMED_KEYS = ("median_s", "min_s", "max_s", "bandwidth_gbs", "bandwidth_gbs_best", "verify_error")


def quick_config(**kw):
    base = dict(sizes=(300, PARALLEL_MIN), repeat=2, progress=False, peers=False, backends=("numba-cpu",))
    return bench.Config.quick_defaults(**{**base, **kw})


@pytest.fixture(scope="module")
def quick_doc(tmp_path_factory):
    """One quick CLI run on tiny sizes: the sweep (serial and parallel loops), many tensors, overhead."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    code = cli_main(["bench", "--quick", "--sizes", "300,2^15", "--backends", "numba-cpu", "--no-peers",
                     "--many", "--repeat", "2", "--no-progress", "--optimizers", "adam,amsgrad",
                     "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_json_schema(quick_doc):
    doc = quick_doc
    assert doc["schema"] == bench.SCHEMA
    machine = doc["machine"]
    for key in ("cpu_model", "cpu_count", "numba_threads", "versions", "env", "gpu"):
        assert key in machine
    assert machine["versions"]["numpy"] and machine["env"]["OMP_WAIT_POLICY"]
    assert doc["config"]["sizes"] == [300, 2**15] and doc["config"]["quick"] is True
    assert set(doc["accounting"]) == {"adam", "amsgrad"}
    suites = {r["suite"] for r in doc["results"]}
    assert suites == {"sizes", "many", "overhead"}
    for row in doc["results"]:
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["status"] in ("ok", "failed", "error", "unavailable")
        if row["status"] == "ok":
            assert len(row["samples_s"]) == doc["config"]["repeat"]
            assert all(isinstance(row[k], float) and row[k] > 0 for k in TIMED_KEYS[:5])
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
    ours = [r for r in doc["results"] if r["group"] == "ours" and r["suite"] == "sizes"]
    assert ours and all(r["status"] == "ok" for r in ours)
    for r in doc["ratios"]:
        assert 0 < r["ours_over_ceiling"]


def test_many_tensor_rows(quick_doc):
    many = [r for r in quick_doc["results"] if r["suite"] == "many"]
    layouts = {(r["implementation"], r["layout"]) for r in many}
    assert ("gpuadam numba-cpu Adam.step", "one tensor") in layouts
    assert ("gpuadam numba-cpu Adam.step", "separate arrays") in layouts
    flat = [r for r in many if r["layout"] == "flat buffer"]
    assert flat and all(r["status"] == "ok" and r["launches"] == "one" for r in flat)
    assert len({r["size"] for r in many}) == 1  # one tensor holds as many elements as the many
    assert {r["tensors"] for r in many} == {1, quick_doc["config"]["many_tensors"]}


def test_every_timed_implementation_was_verified(quick_doc):
    timed = [r for r in quick_doc["results"] if r["samples_s"]]
    assert timed
    for r in timed:
        assert r["status"] == "ok" and r["verified"] and r["verify_error"] <= 1.0, r


class _WrongCase(bench.Case):
    """Plain SGD where Adam was asked for: runs, and is wrong."""

    def __init__(self, problem):
        self.p, self.g = problem.p0.copy(), problem.g1.copy()

    def step(self, k):
        self.p -= 1e-3 * self.g

    def set_grad(self, g):
        self.g[...] = g

    def state(self):
        zeros = np.zeros_like(self.p)
        return {"p": self.p, "m": zeros, "v": zeros}


class WrongImplementation(bench.Implementation):
    name = "deliberately wrong"

    def setup(self, problem, sets):
        return _WrongCase(problem)


class SpyImplementation(bench.NumpyPeer):
    """The NumPy peer, logging each call, so the order of verification and timing shows."""

    name = "spy"

    def __init__(self):
        self.log = []

    def setup(self, problem, sets):
        case = super().setup(problem, sets)
        log = self.log
        step, state = case.step, case.state
        case.step = lambda k: (log.append("step"), step(k))[1]
        case.state = lambda: (log.append("state"), state())[1]
        return case


def test_wrong_implementation_fails_and_is_not_timed_and_timing_follows_verification():
    spy = SpyImplementation()
    doc = bench.run(quick_config(sizes=(1000,), overhead=False), extra=[WrongImplementation(), spy])
    rows = {r["implementation"]: r for r in doc["results"]}
    wrong = rows["deliberately wrong"]
    assert wrong["status"] == "failed" and not wrong["verified"] and wrong["verify_error"] > 1
    assert wrong["samples_s"] == [] and wrong["median_s"] is None and wrong["bandwidth_gbs"] is None
    assert "reference" in wrong["reason"]
    assert rows["spy"]["status"] == "ok" and rows["spy"]["verified"]
    first_read = spy.log.index("state")
    assert spy.log[:first_read] == ["step"] * bench.VERIFY_STEPS  # nothing ran before the check
    assert spy.log.count("state") == 1 and len(spy.log) > first_read + 1  # timed only afterwards
    assert "deliberately wrong" not in " ".join(r["ours"] for r in doc["ratios"])


def test_cli_exit_code_and_messages(capsys):
    assert cli_main(["bench", "--dtype", "float16", "--no-progress"]) == 2
    assert "not timed yet" in capsys.readouterr().err
    assert cli_main(["bench", "--sizes", "2^x", "--no-progress"]) == 2
    assert "2^x" in capsys.readouterr().err


def test_parse_sizes():
    assert bench.parse_sizes("2^16, 2**4,1000,1e6") == (65536, 16, 1000, 1_000_000)
    for bad in ("0", "1.5", "two", "2^"):
        with pytest.raises(ValueError):
            bench.parse_sizes(bad)


# --- the ceiling's accounting --------------------------------------------------------------


def test_bytes_per_element():
    assert bench.OPTIMIZERS["adam"].bytes_per_element(np.float32) == 28  # 16 read + 12 written
    assert bench.OPTIMIZERS["adamw"].bytes_per_element(np.float32) == 28
    assert bench.OPTIMIZERS["amsgrad"].bytes_per_element(np.float32) == 36  # 20 read + 16 written
    assert bench.OPTIMIZERS["adam"].bytes_per_element(np.float64) == 56
    acc = bench.OPTIMIZERS["adam"].accounting(np.float32)
    assert acc["reads"] == ["p", "g", "m", "v"] and acc["writes"] == ["p", "m", "v"]
    assert "28 B/element" in acc["definition"]


def test_bandwidth_and_ceiling_fraction_are_bytes_over_time(quick_doc):
    rows = [r for r in quick_doc["results"] if r["suite"] in ("sizes", "many") and r["median_s"]]
    for r in rows:
        bpe = quick_doc["accounting"][r["optimizer"]]["bytes_per_element"]
        assert r["bytes_per_step"] == bpe * r["size"]
        assert math.isclose(r["bandwidth_gbs"], r["bytes_per_step"] / r["median_s"] / 1e9, rel_tol=1e-9)
        assert math.isclose(r["bandwidth_gbs_best"], r["bytes_per_step"] / r["min_s"] / 1e9, rel_tol=1e-9)
    for r in rows:
        ceiling = next(c for c in rows if c["group"] == "ceiling" and c["suite"] == r["suite"]
                       and c["optimizer"] == r["optimizer"] and c["size"] == r["size"])
        assert ceiling["bytes_per_step"] == r["bytes_per_step"]  # counted the same way
        assert math.isclose(r["ceiling_fraction"], ceiling["median_s"] / r["median_s"], rel_tol=1e-9)


@pytest.mark.parametrize("rule", ["adam", "amsgrad"])
@pytest.mark.parametrize("n", [1000, PARALLEL_MIN + 3])  # the serial and the parallel loop
def test_cpu_ceiling_reads_and_writes_every_array(rule, n):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(5 if rule == "amsgrad" else 4)]
    before = [a.copy() for a in arrays]
    bench.ceiling_kernel("numba-cpu", rule)(*arrays)
    p, g, m, v = before[:4]
    np.testing.assert_array_equal(arrays[0], g)
    np.testing.assert_array_equal(arrays[1], g)  # g is only read
    np.testing.assert_array_equal(arrays[2], p)
    np.testing.assert_array_equal(arrays[3], m + v)
    if rule == "amsgrad":
        np.testing.assert_array_equal(arrays[4], before[4] + v)


def test_cuda_ceiling_compiles_to_the_same_loads_and_stores():
    """For sm_90 (no GPU needed, only NVVM): 4 loads and 3 stores for Adam, 5 and 4 for AMSGrad."""
    code = (
        "import re\n"
        "from numba import cuda, float32\n"
        "from gpuadam import bench_cuda\n"
        "for f, n in ((bench_cuda.move_adam, 4), (bench_cuda.move_amsgrad, 5)):\n"
        "    ptx, _ = cuda.compile_ptx(f, (float32[::1],) * n, cc=(9, 0))\n"
        "    print(len(re.findall(r'ld\\.global', ptx)), len(re.findall(r'st\\.global', ptx)),"
        " len(re.findall(r'\\.f64', ptx)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.skip(f"cannot compile PTX here: {out.stderr.strip().splitlines()[-1:]}")
    assert out.stdout.split() == ["4", "3", "0", "5", "4", "0"]


def test_peers_on_the_cpu_verify():
    """NumPy always; PyTorch and optax when installed (DeepSpeed's op build is too slow for a test)."""
    extra = [bench.NumpyPeer(), bench.TorchPeer("foreach", "cpu"), bench.TorchPeer("fused", "cpu"),
             bench.OptaxPeer("cpu")]
    doc = bench.run(quick_config(sizes=(PARALLEL_MIN + 5,), overhead=False, repeat=1,
                                 optimizers=("adamw",)), extra=extra)
    rows = {r["implementation"]: r for r in doc["results"]}
    assert rows["numpy (in place, blocked)"]["status"] == "ok"
    for impl in extra[1:]:
        assert rows[impl.name]["status"] in ("ok", "unavailable"), rows[impl.name]


# --- the GPU timing path, in Numba's CUDA simulator --------------------------------------


def test_gpu_timing_path_in_the_simulator(tmp_path):
    """CUDA events, buffer sets rotated past the L2 cache, verification: all in the simulator.

    Its own process: NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported.
    """
    path = tmp_path / "sim.json"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
    out = subprocess.run(
        [sys.executable, "-m", "gpuadam", "bench", "--quick", "--sizes", "100", "--backends", "numba-cuda",
         "--no-peers", "--repeat", "2", "--max-buffer-sets", "3", "--no-progress", "--json", str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    doc = json.loads(path.read_text())
    assert "simulator" in json.dumps(doc["machine"]["gpu"])
    sweep = [r for r in doc["results"] if r["suite"] == "sizes"]
    assert {r["implementation"] for r in sweep} == {
        "ceiling numba-cuda (same bytes, no math)", "gpuadam numba-cuda Adam.step", "gpuadam numba-cuda launch"}
    for r in sweep:
        assert r["status"] == "ok" and r["verified"] and r["device"] == "gpu", r
        assert r["timer"] == "cuda-events"
        assert r["event_timing"] is False  # the simulator records no times; the wall clock stood in
        assert r["buffer_sets"] == 3  # 100 elements fit in any L2: rotated, up to the cap
        assert len(r["samples_s"]) == 2 and r["ceiling_fraction"] > 0
    over = [r for r in doc["results"] if r["suite"] == "overhead"]
    assert over and all(r["status"] == "ok" and r["timer"] == "perf_counter" and r["buffer_sets"] == 1
                        for r in over)

"""``gpuadam bench``: the JSON it writes, verification before timing, the ceiling's accounting, and
its GPU timing path in Numba's CUDA simulator (in a process of its own). No timing assertions."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpuadam import bench
from gpuadam.cli import main as cli_main
from gpuadam.hyper import AdamHyper
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


def test_gpuadam_torch_rows_are_verified_beside_torchs(quick_doc):
    """gpuadam.torch.Adam.step runs in the many-tensor and overhead tables, verified as ours are."""
    rows = [r for r in quick_doc["results"] if r["implementation"] == "gpuadam.torch Adam.step (cpu)"]
    assert {r["suite"] for r in rows} == {"many", "overhead"}
    for r in rows:
        assert r["group"] == "ours" and r["status"] == "ok" and r["verified"], r


def test_table_reads_cleanly(quick_doc):
    """Whole layout names in the many-tensor table, no dangling separator without peers, no "0 s"."""
    table = bench.format_table(quick_doc)
    lines = table.splitlines()
    for layout in ("separate arrays", "flat buffer", "one tensor"):
        assert any(line.lstrip().startswith(f"{layout}  gpuadam") for line in lines), table
    ratios = [line for line in lines if "of ceiling" in line]
    assert ratios and all(not line.rstrip().endswith(";") and "ceiling; " not in line for line in ratios), table
    assert "(0 s;" not in table
    assert bench.format_table({**quick_doc, "seconds": 0.4}).splitlines()[-1].startswith("(0.4 s;")


def test_missing_peers_say_how_to_get_them(monkeypatch):
    import sys

    from gpuadam.bench import peers

    def no_torch():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(peers, "import_torch", no_torch)
    for name in ("jax", "deepspeed"):
        monkeypatch.setitem(sys.modules, name, None)
    problem = bench.make_problem(bench.OPTIMIZERS["adam"], np.float32, (10,), 0)
    for impl in (bench.TorchPeer("fused", "cpu"), bench.OptaxPeer("cpu"), bench.DeepSpeedPeer()):
        reason = impl.unavailable(problem)
        assert reason.endswith("not installed: pip install 'gpuadam[bench]'"), reason


def test_progress_never_names_a_peer_that_does_not_run(monkeypatch):
    """The bar names what runs now: an implementation that is not installed is never its label."""
    from gpuadam.bench import suite

    notes = []

    class Recorder(suite.Progress):
        def note(self, text):
            notes.append(text)

    class Missing(bench.Implementation):
        name = "not-installed-peer"

        def unavailable(self, problem):
            return "not installed"

    monkeypatch.setattr(suite, "Progress", Recorder)
    bench.run(quick_config(sizes=(1000,), overhead=False, repeat=2), extra=[Missing()])
    assert notes and not any("not-installed-peer" in n for n in notes), notes
    assert notes[-1].startswith("timing ") and notes[-1].endswith("2/2)"), notes


def test_rounds_allocate_in_a_rotated_order_and_report_their_spread():
    """Each round sets up fresh buffers with another implementation first; every round's median is
    kept, their spread reported, and the peer ratios given per round too."""
    doc = bench.run(quick_config(sizes=(1000,), overhead=False, repeat=2, rounds=3),
                    extra=[bench.NumpyPeer()])
    timed = [r for r in doc["results"] if r["status"] == "ok"]
    assert len(timed) >= 4 and doc["config"]["rounds"] == 3
    for r in timed:
        assert len(r["round_medians_s"]) == 3 and len(r["samples_s"]) == 6, r
        assert r["spread"] == pytest.approx(max(r["round_medians_s"]) / min(r["round_medians_s"]) - 1)
    firsts = sorted(j for r in timed for j in r["allocated_first_in_rounds"])
    assert firsts == [0, 1, 2]  # one implementation first in each round
    assert len({r["implementation"] for r in timed if r["allocated_first_in_rounds"]}) == 3  # a different one
    (ratio,) = doc["ratios"]
    assert len(ratio["peer_time_over_ours_rounds"]["numpy (in place, blocked)"]) == 3
    assert re.search(r"numpy \(in place, blocked\) [\d.]+x \(rounds [\d.]+/[\d.]+/[\d.]+\)", bench.format_table(doc))


def test_cpu_params_are_allocated_as_a_users_are():
    """Our params and grads in the bench come from NumPy, as in a training loop, not from our
    cache-line-aligned allocator (which only the optimizer's own state uses)."""
    from gpuadam.bench.cases import BackendCase

    problem = bench.make_problem(bench.OPTIMIZERS["adam"], np.float32, (1 << 20,), 0)
    case = BackendCase("numba-cpu", problem, 1)
    arrays = case.params[0] + case.grads[0]
    assert all(type(a) is np.ndarray and a.base is None for a in arrays)  # NumPy's own, not a view of ours


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
    checked = 2 * bench.VERIFY_STEPS
    assert spy.log[:checked] == ["step", "state"] * bench.VERIFY_STEPS  # each step checked, before any timing
    assert spy.log.count("state") == bench.VERIFY_STEPS and len(spy.log) > checked + 1  # timed only afterwards
    assert "deliberately wrong" not in " ".join(r["ours"] for r in doc["ratios"])


def test_cli_exit_code_and_messages(capsys):
    assert cli_main(["bench", "--master-weights", "--no-progress"]) == 2
    assert "float16/bfloat16" in capsys.readouterr().err
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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_bytes_per_element_of_half_storage(dtype):
    dtype = bench.numpy_dtype(dtype)
    adam, amsgrad = bench.OPTIMIZERS["adam"], bench.OPTIMIZERS["amsgrad"]
    assert adam.bytes_per_element(dtype) == 14  # half state: 7 arrays of 2 B
    assert amsgrad.bytes_per_element(dtype) == 18
    # master weights: w, m, v (and vmax) in float32 read and written, g read and p written in 16 bits
    assert adam.bytes_per_element(dtype, master=True) == 28  # w4 g2 m4 v4 read, m4 v4 w4 p2 written
    assert amsgrad.bytes_per_element(dtype, master=True) == 36
    acc = adam.accounting(dtype, master=True)
    assert acc["reads"] == ["w", "g", "m", "v"] and acc["writes"] == ["m", "v", "w", "p"]
    assert "(14 B) and writes" in acc["definition"] and "28 B/element" in acc["definition"]


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


@pytest.mark.parametrize("rule", ["adam", "amsgrad"])
@pytest.mark.parametrize("n", [1000, PARALLEL_MIN + 3])
def test_cpu_ceiling_of_half_storage(rule, n):
    """Half state: the same moves on 16-bit patterns (sums wrap); master weights: w, m, v (x) float32
    beside the half g and p16."""
    rng = np.random.default_rng(1)
    bits = [rng.integers(0, 1 << 16, n).astype(np.uint16) for _ in range(5 if rule == "amsgrad" else 4)]
    before = [a.copy() for a in bits]
    bench.ceiling_kernel("numba-cpu", rule)(*bits)
    np.testing.assert_array_equal(bits[0], before[1])
    np.testing.assert_array_equal(bits[2], before[0])
    np.testing.assert_array_equal(bits[3], before[2] + before[3])  # uint16: wraps as the kernel's store does
    f32 = [rng.standard_normal(n).astype(np.float32) for _ in range(4 if rule == "amsgrad" else 3)]
    g, p16 = (rng.integers(0, 1 << 16, n).astype(np.uint16) for _ in range(2))
    w, m, v = (x.copy() for x in f32[:3])
    arrays = (f32[0], g, f32[1], f32[2], *f32[3:], p16)
    bench.ceiling_kernel("numba-cpu", rule, master=True)(*arrays)
    np.testing.assert_array_equal(arrays[0], m)
    np.testing.assert_array_equal(arrays[2], w)
    np.testing.assert_array_equal(arrays[3], m + v)
    np.testing.assert_array_equal(p16, g)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("master", [False, True], ids=["half-state", "master-weights"])
def test_half_storage_runs_verified_with_its_own_ceiling(dtype, master):
    doc = bench.run(quick_config(dtype=dtype, master_weights=master, sizes=(1000,), optimizers=("adam", "amsgrad"),
                                 overhead=False))
    assert doc["config"]["dtype"] == dtype and doc["config"]["master_weights"] is master
    assert doc["accounting"]["adam"]["bytes_per_element"] == (28 if master else 14)
    rows = [r for r in doc["results"] if r["status"] != "unavailable"]
    assert {r["implementation"] for r in rows} == {
        "ceiling numba-cpu (same bytes, no math)", "gpuadam numba-cpu Adam.step", "gpuadam numba-cpu launch"}
    for r in rows:
        assert r["status"] == "ok" and r["verified"] and r["verify_error"] <= 1.0, r
        assert r["dtype"] == dtype and r["master_weights"] is master
        assert r["verify_storage_ulps"] == (0 if r["group"] == "ceiling" else 1)
        assert r["ceiling_fraction"] > 0
    # ours round once per step: within half an ulp of the reference (plus float32 math), never 1
    assert all(r["verify_error"] <= 0.6 for r in rows if r["group"] == "ours")
    functional = [r for r in doc["results"] if r["implementation"].endswith("adam_step")]
    assert not functional  # adam_step is not in the sweep; its refusal of half params is in test_half


class _ThreeTimesTheStep(bench.OursOptimizer):
    """Our optimizer with lr 3e-3 where 1e-3 was asked: m and v right, p off by 2 lr, which is
    less than half an ulp of most half-precision params."""

    def __init__(self, backend):
        super().__init__(backend)
        self.name = "three times the step"

    def setup(self, problem, sets):
        spec = bench.OPTIMIZERS["adam"]
        wrong = bench.OptimizerSpec(spec.name, spec.rule, AdamHyper(lr=3e-3), spec.reads, spec.writes)
        return super().setup(bench.Problem(wrong, problem.dtype, problem.sizes, problem.p0, problem.g1,
                                           problem.g2, problem.sample, problem.master), sets)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_verification_catches_a_wrong_step(dtype):
    """Per-element ulps have teeth where a max-norm budget would not: the params a wrong step size
    moves by less than their ulp hide it, the small ones show it."""
    wrong = _ThreeTimesTheStep("numba-cpu")
    doc = bench.run(quick_config(dtype=dtype, sizes=(4000,), overhead=False), extra=[wrong])
    row = next(r for r in doc["results"] if r["implementation"] == "three times the step")
    assert row["status"] == "failed" and not row["samples_s"], row
    assert "reference: p at step" in row["reason"]  # caught on p: m and v are right


def test_cuda_ceiling_compiles_to_the_same_loads_and_stores():
    """For sm_90 (no GPU needed, only NVVM): 4 loads and 3 stores for Adam, 5 and 4 for AMSGrad; with
    master weights one more store (the half param); int8 state: p g mq vq and the two absmax read,
    all but g written; bfloat16 state as Adam."""
    code = (
        "import re\n"
        "from numba import cuda, float32, uint8, uint16\n"
        "from gpuadam.bench import ceiling_cuda as bench_cuda\n"
        "f, h, b = float32[::1], uint16[::1], uint8[::1]\n"
        "for f, sig in ((bench_cuda.move_adam, (f,) * 4), (bench_cuda.move_amsgrad, (f,) * 5),\n"
        "               (bench_cuda.move_adam_master, (f, h, f, f, h)),\n"
        "               (bench_cuda.move_amsgrad_master, (f, h, f, f, f, h)),\n"
        "               (bench_cuda.move_int8, (f, f, b, f, b, f)), (bench_cuda.move_bf16state, (f, f, h, h))):\n"
        "    ptx, _ = cuda.compile_ptx(f, sig, cc=(9, 0))\n"
        "    print(len(re.findall(r'ld\\.global', ptx)), len(re.findall(r'st\\.global', ptx)),"
        " len(re.findall(r'\\.f64', ptx)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.skip(f"cannot compile PTX here: {out.stderr.strip().splitlines()[-1:]}")
    assert out.stdout.split() == ["4", "3", "0", "5", "4", "0", "4", "4", "0", "5", "5", "0", "6", "5", "0",
                                  "4", "3", "0"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peers_on_the_cpu_verify(dtype):
    """NumPy always; PyTorch and optax when installed (DeepSpeed's op build is too slow for a test)."""
    extra = [bench.NumpyPeer(), bench.TorchPeer("foreach", "cpu"), bench.TorchPeer("fused", "cpu"),
             bench.OptaxPeer("cpu")]
    doc = bench.run(quick_config(sizes=(PARALLEL_MIN + 5,), overhead=False, repeat=1, dtype=dtype,
                                 optimizers=("adamw",)), extra=extra)
    rows = {r["implementation"]: r for r in doc["results"]}
    assert rows["numpy (in place, blocked)"]["status"] == "ok"
    for impl in extra[1:]:
        assert rows[impl.name]["status"] in ("ok", "unavailable"), rows[impl.name]


# --- the GPU timing path, in Numba's CUDA simulator --------------------------------------


@pytest.mark.parametrize("storage", [(), ("--dtype", "bfloat16"), ("--dtype", "float16", "--master-weights")],
                         ids=["float32", "bfloat16-as-uint16", "float16-master"])
def test_gpu_timing_path_in_the_simulator(tmp_path, storage):
    """CUDA events, buffer sets rotated past the L2 cache, verification: all in the simulator, for
    float32, for bfloat16 (uint16 on the device, declared) and for float16 with master weights.

    Its own process: NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported.
    """
    path = tmp_path / "sim.json"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
    out = subprocess.run(
        [sys.executable, "-m", "gpuadam", "bench", "--quick", "--sizes", "100", "--backends", "numba-cuda",
         "--no-peers", "--repeat", "2", "--max-buffer-sets", "3", "--no-progress", "--json", str(path), *storage],
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
    refused = {r["implementation"] for r in over if r["status"] == "unavailable"}
    # adam_step takes float32/float64; torch sees no CUDA device in the simulator
    assert refused == ({"gpuadam numba-cuda adam_step"} if storage else set()) | {"gpuadam.torch Adam.step (cuda)"}
    assert over and all(r["status"] == "ok" and r["timer"] == "perf_counter" and r["buffer_sets"] == 1
                        for r in over if r["status"] != "unavailable")


# --- lean optimizer state (--state-dtype) -------------------------------------------------


def test_lean_layouts_bytes():
    """int8: float32 p and g (12 B) and a uint8 code per moment each way (4 B), plus one float32
    absmax per block of 256 of each tensor per moment each way; bfloat16: 2 B per moment each way."""
    assert bench.lean_bytes_per_step("int8", (4096,)) == 4096 * 16 + 16 * 16
    assert bench.lean_bytes_per_step("int8", (300, 4096)) == 4396 * 16 + (2 + 16) * 16  # blocks follow tensors
    assert bench.lean_bytes_per_step("bfloat16", (300, 4096)) == 4396 * 20
    assert bench.lean_accounting("int8")["bytes_per_element"] == 16.0625
    with pytest.raises(ValueError, match="int4"):
        bench.lean_bytes_per_step("int4", (10,))


@pytest.mark.parametrize("n", [1000, PARALLEL_MIN + 3])  # the serial and the parallel loop
def test_cpu_lean_ceilings_move_every_array(n):
    rng = np.random.default_rng(2)
    p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    mq, vq = (rng.integers(0, 256, n).astype(np.uint8) for _ in range(2))
    ma, va = (rng.random(-(-n // 256), dtype=np.float32) for _ in range(2))
    before = [x.copy() for x in (p, g, mq, ma, vq, va)]
    bench.ceiling_kernel("numba-cpu", "adam/int8")(p, g, mq, ma, vq, va)
    np.testing.assert_array_equal(p, before[0] + before[1])
    np.testing.assert_array_equal(g, before[1])
    np.testing.assert_array_equal(mq, before[4])
    np.testing.assert_array_equal(vq, before[2] + before[4])  # uint8: wraps as the store does
    np.testing.assert_array_equal(ma, before[5])
    np.testing.assert_array_equal(va, before[3] + before[5])
    m, v = (rng.integers(0, 1 << 16, n).astype(np.uint16) for _ in range(2))
    p0, m0, v0 = p.copy(), m.copy(), v.copy()
    bench.ceiling_kernel("numba-cpu", "adam/bf16state")(p, g, m, v)
    np.testing.assert_array_equal(p, p0 + g)
    np.testing.assert_array_equal(m, v0)
    np.testing.assert_array_equal(v, m0 + v0)


def _lean_config(**kw):
    base = dict(sizes=(4096,), overhead=False, repeat=1, state_dtypes=("float32", "bfloat16", "int8"))
    return quick_config(**{**base, **kw})


def test_lean_state_rows_verified_against_their_layouts_ceiling_and_torch_fused():
    from gpuadam.bench.lean_state import BitsandbytesPeer

    extra = [bench.TorchPeer("fused", "cpu"), BitsandbytesPeer("cpu")]
    doc = bench.run(_lean_config(), extra=extra)
    rows = {r["implementation"]: r for r in doc["results"]}
    assert doc["config"]["state_dtypes"] == ["float32", "bfloat16", "int8"]
    assert doc["state_layouts"]["int8"]["bytes_per_element"] == 16.0625
    assert doc["state_layouts"]["bfloat16"]["bytes_per_element"] == 20
    for kind in ("bfloat16", "int8"):
        ours = rows[f"gpuadam numba-cpu Adam(state_dtype={kind}).step"]
        ceiling = rows[f"ceiling numba-cpu {kind} state (same bytes, no math)"]
        for r in (ours, ceiling):
            assert r["status"] == "ok" and r["verified"] and r["verify_error"] <= 1.0 and r["state_dtype"] == kind, r
            assert r["bytes_per_step"] == bench.lean_bytes_per_step(kind, (4096,))
            assert math.isclose(r["bandwidth_gbs"], r["bytes_per_step"] / r["median_s"] / 1e9, rel_tol=1e-9)
        assert ceiling["verify_error"] == 0  # it moves bits: exact
        assert math.isclose(ours["ceiling_fraction"], ceiling["median_s"] / ours["median_s"], rel_tol=1e-9)
        (ratio,) = [q for q in doc["ratios"] if q["ours"] == ours["implementation"]]
        assert ratio["state_dtype"] == kind and "torch fused (cpu)" in ratio["peer_time_over_ours"]
    plain = rows["gpuadam numba-cpu Adam.step"]
    assert plain["state_dtype"] is None and plain["bytes_per_step"] == 28 * 4096
    bnb = rows["bitsandbytes Adam8bit (cpu)"]
    if bnb["status"] != "unavailable" or os.environ.get("GPUADAM_REQUIRE_ALL"):
        assert bnb["status"] == "ok" and bnb["verified"] and bnb["state_dtype"] == "int8", bnb
        assert bnb["ceiling_fraction"] > 0 and "3e-5" in bnb["note"]
    table = bench.format_table(doc)
    lean = table[table.index("== lean optimizer state"):]
    assert re.search(r"2\^12  gpuadam numba-cpu Adam\(state_dtype=int8\)\.step +int8 .* \d+% +[\d.]+x", lean), lean
    assert re.search(r"2\^12  torch fused \(cpu\) +float32 .* 1\.00x", lean), lean
    main = table[: table.index("== lean optimizer state")]
    assert "state_dtype=" not in main and "Adam8bit" not in main  # the 28 B/element table has none of them


def test_lean_rows_ask_the_optimizer_which_backends_take_them(monkeypatch):
    """A backend is benchmarked with lean state exactly when gpuadam.Adam takes state_dtype there."""
    import gpuadam
    from gpuadam.bench import cases
    from gpuadam.bench.lean_state import OursLean

    problem = bench.make_problem(bench.OPTIMIZERS["adam"], np.float32, (4096,), 0)
    assert OursLean("numba-cpu", "int8").unavailable(problem) is None
    small = bench.make_problem(bench.OPTIMIZERS["adam"], np.float32, (1000,), 0)
    assert "under 4096" in OursLean("numba-cpu", "int8").unavailable(small)
    amsgrad = bench.make_problem(bench.OPTIMIZERS["amsgrad"], np.float32, (4096,), 0)
    assert "amsgrad" in OursLean("numba-cpu", "bfloat16").unavailable(amsgrad)

    def refuse(*args, **kw):
        raise ValueError("state_dtype='int8': not on this backend")

    cases.lean_refusal.cache_clear()
    monkeypatch.setattr(gpuadam, "Adam", refuse)
    try:
        assert OursLean("numba-cpu", "int8").unavailable(problem) == "state_dtype='int8': not on this backend"
        assert "not on this backend" in bench.ceiling.LeanCeiling("numba-cpu", "int8").unavailable(problem)
    finally:
        cases.lean_refusal.cache_clear()


class _BrokenLean:
    """Our lean step, then the state broken the way a wrong kernel would leave it."""

    @staticmethod
    def make(kind, how):
        from gpuadam.bench import lean_state

        class Case(lean_state._OursLeanCase):
            def step(self, k):
                super().step(k)
                (state,) = self.opts[k].state
                if how == "absmax":  # a scale 1.25x the block's largest magnitude
                    state["exp_avg_absmax"] *= np.float32(1.25)
                elif how == "codes":  # v three codes up, as a nearest-code search off by three
                    codes = state["exp_avg_sq_codes"]
                    codes[...] = np.minimum(codes.astype(np.int64) + 3, 255)
                else:  # bfloat16 m two ulps off (its magnitude's bits + 2)
                    state["exp_avg_bf16_bits"] += np.uint16(2)

        class Broken(lean_state.OursLean):
            def __init__(self):
                super().__init__("numba-cpu", kind)
                self.name = f"broken {kind} ({how})"

            def setup(self, problem, sets):
                return Case(self.backend, problem, sets, self.state_dtype)

        return Broken()


def test_a_broken_lean_row_is_rejected_and_not_timed():
    """The lean check has teeth: a scale off by 1.25, codes three off, bfloat16 bits two ulps off."""
    broken = [_BrokenLean.make("int8", "absmax"), _BrokenLean.make("int8", "codes"),
              _BrokenLean.make("bfloat16", "bits")]
    doc = bench.run(_lean_config(state_dtypes=("int8",)), extra=broken)
    rows = {r["implementation"]: r for r in doc["results"]}
    assert rows["gpuadam numba-cpu Adam(state_dtype=int8).step"]["status"] == "ok"
    for impl, where in zip(broken, ("m_absmax at step", "v at step", "m at step")):
        r = rows[impl.name]
        assert r["status"] == "failed" and not r["samples_s"] and r["verify_error"] > 1, r
        assert f"reference: {where}" in r["reason"], r["reason"]


@pytest.mark.parametrize("argv, words", [
    (["--state-dtype", "int4"], "float32, bfloat16, int8"),
    (["--state-dtype", "int8", "--dtype", "bfloat16"], "float32 params"),
    (["--state-dtype", "bfloat16", "--optimizers", "amsgrad"], "adam/adamw"),
])
def test_state_dtype_refusals(capsys, argv, words):
    assert cli_main(["bench", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpuadam bench: --state-dtype") and words in err, err


def test_cuda_lean_ceilings_in_the_simulator():
    """The Numba CUDA lean ceilings, launched as the bench launches them (int8: a thread block per
    quantisation block, thread 0 moving the absmax), on a tail block too. Its own process."""
    code = (
        "import numpy as np\n"
        "from numba import cuda\n"
        "from gpuadam.bench import ceiling_cuda\n"
        "rng = np.random.default_rng(0)\n"
        "n = 600\n"
        "p, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))\n"
        "mq, vq = (rng.integers(0, 256, n).astype(np.uint8) for _ in range(2))\n"
        "ma, va = (rng.random(3, dtype=np.float32) for _ in range(2))\n"
        "d = [cuda.to_device(x) for x in (p, g, mq, ma, vq, va)]\n"
        "ceiling_cuda.launch('adam/int8', *d)\n"
        "out = [x.copy_to_host() for x in d]\n"
        "want = [p + g, g, vq, va, mq + vq, ma + va]\n"
        "assert all(np.array_equal(a, b) for a, b in zip(out, want)), 'int8'\n"
        "m, v = (rng.integers(0, 1 << 16, n).astype(np.uint16) for _ in range(2))\n"
        "d = [cuda.to_device(x) for x in (p, g, m, v)]\n"
        "ceiling_cuda.launch('adam/bf16state', *d)\n"
        "out = [x.copy_to_host() for x in d]\n"
        "assert all(np.array_equal(a, b) for a, b in zip(out, [p + g, g, v, m + v])), 'bfloat16'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout[-2000:] + out.stderr[-3000:]


def test_cupy_lean_ceilings_on_the_host(tmp_path_factory):
    """The CuPy lean ceiling bodies (``CUPY_CEILING``), as CuPy is given them, in a C++ loop over i
    compiled with g++ and run through ctypes: every array moved as the Numba ceilings move it."""
    import ctypes

    from helpers import build_host_library

    c_types = {"float32": "float", "uint8": "unsigned char", "uint16": "unsigned short"}
    np_types = {"float32": np.float32, "uint8": np.uint8, "uint16": np.uint16}
    source, signatures = "#include <cstddef>\n", {}
    for rule in ("adam/int8", "adam/bf16state"):
        ins, outs, body = bench.CUPY_CEILING[rule]
        params = [x.split() for x in f"{ins}, {outs}".split(",")]  # [raw, type, name]
        name = "ceiling_" + rule.replace("/", "_")
        args = ", ".join(f"{c_types[t]}* {n}" for _, t, n in params)
        source += f'extern "C" void {name}(const ptrdiff_t n, {args}) {{\n' \
                  f"  for (ptrdiff_t i = 0; i < n; ++i) {{\n{body}\n  }}\n}}\n"
        signatures[rule] = (name, [np_types[t] for _, t, _ in params])
    lib = build_host_library(tmp_path_factory, "cupy_lean_ceiling", source)
    rng = np.random.default_rng(3)
    n = 600

    def run(rule, arrays):
        name, dtypes = signatures[rule]
        assert [a.dtype for a in arrays] == [np.dtype(d) for d in dtypes]
        getattr(lib, name)(ctypes.c_ssize_t(n), *(a.ctypes.data_as(ctypes.c_void_p) for a in arrays))

    g, p = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    mq, vq = (rng.integers(0, 256, n).astype(np.uint8) for _ in range(2))
    ma, va = (rng.random(3, dtype=np.float32) for _ in range(2))
    want = [g, p + g, vq, va, mq + vq, ma + va]
    arrays = [x.copy() for x in (g, p, mq, ma, vq, va)]  # the kernel's order: ins, then outs
    run("adam/int8", arrays)
    for got, expected in zip(arrays, want):
        np.testing.assert_array_equal(got, expected)
    m, v = (rng.integers(0, 1 << 16, n).astype(np.uint16) for _ in range(2))
    arrays = [x.copy() for x in (g, p, m, v)]
    run("adam/bf16state", arrays)
    for got, expected in zip(arrays, [g, p + g, v, m + v]):
        np.testing.assert_array_equal(got, expected)


def test_lean_rows_on_numba_cuda_in_the_simulator():
    """Our bfloat16-state step and its ceiling on numba-cuda, set up and verified as the bench does
    (device state read back, decoded, checked), on two buffer sets, a tail past the last full
    block of threads. int8's kernel is the simulator's slowest (a thread block per 256 elements):
    its ceiling is run above, the kernel itself in tests/simulator. Its own process."""
    code = (
        "import numpy as np\n"
        "from gpuadam import bench\n"
        "from gpuadam.bench.timing import Entry, verify\n"
        "from gpuadam.kernels import numba_cuda\n"
        "numba_cuda.THREADS = 32  # the simulator pays for every thread\n"
        "problem = bench.make_problem(bench.OPTIMIZERS['adamw'], np.float32, (4196,), 0)\n"
        "for impl in (bench.OursLean('numba-cuda', 'bfloat16'), bench.LeanCeiling('numba-cuda', 'bfloat16')):\n"
        "    assert impl.unavailable(problem) is None, impl.unavailable(problem)\n"
        "    entry = Entry('sizes', impl, problem)\n"
        "    entry.case = impl.setup(problem, 2)\n"
        "    error, where = verify(entry)\n"
        "    assert 0 <= error <= 1, (impl.name, error, where)\n"
        "    entry.case.step(1)\n"
        "    entry.case.sync()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
    out = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout[-2000:] + out.stderr[-3000:]

"""The CuPy lean-state kernels' C source (``kernels/cupy_lean.py``) without a GPU, called with the
very argument tuples the cupy backend's launchers pass (``cupy_lean.int8_args``/``bf16_args``):

- int8: the element functions compiled with g++ behind host functions of the kernels' own parameter
  lists (named scalar constants, or ``_dc``: a constants array), around a serial block reduction
  (the ``__global__`` kernel's shared-memory reduction is CUDA only): bit for bit the Numba host kernel;
- bfloat16 state: the whole ``__global__`` kernels, behind a one-thread shim of CUDA's built-ins,
  bit for bit the Numba host loop, stochastic (``lowp.random32`` at ``i``, split between the moments) and nearest;
- the argument tuples against the kernels' declared C parameters, type for type;
- the whole chain, ``Adam(state_dtype=..., backend="cupy")`` through ``backends.CuPy`` to those host
  builds standing in for the RawKernels: the same bits as numba-cpu over several steps.

Their machine code for sm_90 is held to the bar with every other kernel's (``gpuadam inspect``,
``tests/test_machine_code.py``).
"""

import types

import ml_dtypes
import numpy as np
import pytest
from helpers import ONE_THREAD, build_host_library, call_with_args

import gpuadam
from gpuadam import backends, lean
from gpuadam.hyper import AdamHyper
from gpuadam.kernels import cupy_bookkeeping, cupy_lean, lean_cpu, lean_rules, lowp
from gpuadam.kernels import lean_maps as L
from gpuadam.kernels.rules import N_CONSTANTS, SKIP

MAPS = (L.SIGNED, L.SIGNED_BUCKETS, L.SIGNED_THRESHOLDS, L.UNSIGNED, L.UNSIGNED_BUCKETS, L.UNSIGNED_THRESHOLDS)
HEADERS = "#include <algorithm>\n#include <cmath>\n#include <cstddef>\nusing std::max;\nusing std::sqrt;\n"

HOST_BLOCKS = r"""
/* the int8 kernel's work with its block's threads in turn, then the block's reduction */
template <typename G>
static void host_int8_blocks(float* p, const G* g, unsigned char* mq, float* m_absmax,
    unsigned char* vq, float* v_absmax, const float* c, const float* smap, const unsigned char* sb,
    const float* sthr, const float* umap, const unsigned char* ub, const float* uthr, long long n,
    unsigned short* half_param, int fmt) {
  if (c[LEAN_SKIP]) return;
  float x[LEAN_BLOCK], m[LEAN_BLOCK], v[LEAN_BLOCK];
  for (long long b = 0; b < (n + LEAN_BLOCK - 1) / LEAN_BLOCK; ++b) {
    unsigned int m_top = 0, v_top = 0;
    for (int t = 0; t < LEAN_BLOCK; ++t) {
      const long long i = b * LEAN_BLOCK + t;
      x[t] = m[t] = v[t] = lowp_f32_from_bits(0u);
      if (i < n) lean_int8_update(i, b, p, g, mq, m_absmax, vq, v_absmax, c, smap, umap, fmt, x[t], m[t], v[t]);
      m_top = std::max(m_top, lean_magnitude_bits(m[t]));
      v_top = std::max(v_top, lean_magnitude_bits(v[t]));
    }
    const float new_ma = lowp_f32_from_bits(m_top), new_va = lowp_f32_from_bits(v_top);
    for (int t = 0; t < LEAN_BLOCK; ++t) {
      const long long i = b * LEAN_BLOCK + t;
      if (i < n) lean_int8_store(i, x[t], m[t], v[t], new_ma, new_va, p, mq, vq, sb, sthr, ub, uthr, half_param,
                                 fmt);
    }
    m_absmax[b] = new_ma;
    v_absmax[b] = new_va;
  }
}
"""


def _int8_host_kernel(device_constants, master, rule):
    """A host function named and declared as the int8 kernel, gathering its constants as it does."""
    name = cupy_lean.int8_name(device_constants, master, rule)
    params = cupy_lean.int8_params(device_constants, master, rule)
    return (f'extern "C" void {name}({params}) {{\n'
            f"{cupy_lean.gather_constants(device_constants, rule)}"
            "  host_int8_blocks(p, g, mq, m_absmax, vq, v_absmax, cc, smap, sbuckets, sthr, umap, ubuckets, uthr,\n"
            f"                   n, {cupy_lean._master_args(master)});\n}}\n")


@pytest.fixture(scope="module")
def int8_libs(tmp_path_factory):
    """Per rule with lean kernels, a library of its four int8 kernels' host builds."""
    libs = {}
    for rule in lean_rules.RULES:
        kernels = "".join(_int8_host_kernel(d, m, rule) for d in (False, True) for m in (False, True))
        source = HEADERS + cupy_lean.int8_shared(rule) + HOST_BLOCKS + kernels
        libs[rule] = build_host_library(tmp_path_factory, f"lean_int8_{rule}", source)
    return libs


@pytest.fixture(scope="module")
def bf16_libs(tmp_path_factory):
    """Per rule with lean kernels, its eight bfloat16-state kernels, each its source's own text
    after the shared part."""
    libs = {}
    for rule in lean_rules.RULES:
        shared = cupy_lean.bf16_shared(rule)
        texts = [cupy_lean.bf16_source(s, d, m, rule)[1] for s in (False, True) for d in (False, True)
                 for m in (False, True)]
        assert all(t.startswith(shared) for t in texts)
        source = HEADERS + ONE_THREAD + shared + "".join(t[len(shared):] for t in texts)
        libs[rule] = build_host_library(tmp_path_factory, f"lean_bf16_{rule}", source, ("-Wno-unused-function",))
    return libs


@pytest.fixture(scope="module")
def int8_lib(int8_libs):
    return int8_libs["adam"]


@pytest.fixture(scope="module")
def bf16_lib(bf16_libs):
    return bf16_libs["adam"]


def _constants(seed, skip=False):
    hyper = AdamHyper.from_kwargs(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False,
                                  maximize=seed % 2 == 1, eps_root=0.0, bias_correction=True,
                                  decoupled_weight_decay=seed % 2 == 0)
    c = np.array(hyper.constants(5, np.float32, 1.0), np.float32)
    c[SKIP] = 1.0 if skip else 0.0
    return c


def _pass_constants(c, device_constants):
    """What the launcher gets: a (device) array of the constants, or the host's tuple of scalars."""
    return c.copy() if device_constants else tuple(np.float32(x) for x in c)


def _int8_case(seed, n):
    rng = np.random.default_rng(seed)
    blocks = -(-n // L.BLOCK)
    arrays = [rng.standard_normal(n).astype(np.float32),
              (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 0, n)).astype(np.float32),
              rng.integers(0, 256, n).astype(np.uint8), rng.uniform(0.01, 0.1, blocks).astype(np.float32),
              rng.integers(0, 256, n).astype(np.uint8), rng.uniform(1e-4, 1e-3, blocks).astype(np.float32)]
    arrays[3][0] = 0.0
    return arrays


@pytest.mark.parametrize("device_constants", [False, True], ids=["scalars", "device-constants"])
@pytest.mark.parametrize("seed, n", [(0, 3 * L.BLOCK + 40), (1, 4096 + 17)])
def test_int8_source_is_the_host_kernel_bit_for_bit(int8_lib, seed, n, device_constants):
    arrays, c = _int8_case(seed, n), _constants(seed)
    ours = [a.copy() for a in arrays]
    args = cupy_lean.int8_args(tuple(ours), _pass_constants(c, device_constants), MAPS)
    call_with_args(getattr(int8_lib, cupy_lean.int8_name(device_constants)), args)
    numba = [a.copy() for a in arrays]
    lean_cpu.KERNELS["adam/int8"](*numba, tuple(np.float32(x) for x in c))
    for got, want in zip(ours, numba):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not np.array_equal(ours[0], arrays[0])  # it did step


@pytest.mark.parametrize("device_constants", [False, True], ids=["scalars", "device-constants"])
def test_int8_source_skips(int8_lib, device_constants):
    arrays, c = _int8_case(2, 1000), _constants(2, skip=True)
    ours = [a.copy() for a in arrays]
    args = cupy_lean.int8_args(tuple(ours), _pass_constants(c, device_constants), MAPS)
    call_with_args(getattr(int8_lib, cupy_lean.int8_name(device_constants)), args)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, ours))


def _bf16_case(seed, n):
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    v = (rng.standard_normal(n) ** 2 * 1e-4).astype(np.float32)
    bits = [(x.view(np.uint32) >> 16).astype(np.uint16) for x in (m, v)]
    return [rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32), *bits]


@pytest.mark.parametrize("device_constants", [False, True], ids=["scalars", "device-constants"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_bf16_source_is_the_host_loop_bit_for_bit(bf16_lib, stochastic, device_constants):
    n = 3001
    arrays, c = _bf16_case(3, n), _constants(3)
    # seed and counter past 32 bits: the launcher passes lowp's 32-bit words, as the hash masks them
    state_rounding = (int(stochastic), 2**40 + 12345, 2**33 + 7)
    ours = [a.copy() for a in arrays]
    args = cupy_lean.bf16_args(tuple(ours), _pass_constants(c, device_constants), state_rounding)
    call_with_args(getattr(bf16_lib, cupy_lean.bf16_name(stochastic, device_constants)), args)
    numba = [a.copy() for a in arrays]
    lean_cpu.KERNELS["adam/bf16state"](*numba, tuple(np.float32(x) for x in c), state_rounding)
    for got, want in zip(ours, numba):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not np.array_equal(ours[0], arrays[0])  # it did step
    nearest = [a.copy() for a in arrays]
    lean_cpu.KERNELS["adam/bf16state"](*nearest, tuple(np.float32(x) for x in c), (0, 0, 0))
    # the rounding chosen is the one run: stochastic moves some moments off the nearest
    assert np.array_equal(ours[2], nearest[2]) != stochastic


@pytest.mark.parametrize("device_constants", [False, True], ids=["scalars", "device-constants"])
def test_bf16_source_skips(bf16_lib, device_constants):
    arrays, c = _bf16_case(4, 500), _constants(4, skip=True)
    ours = [a.copy() for a in arrays]
    args = cupy_lean.bf16_args(tuple(ours), _pass_constants(c, device_constants), (1, 5, 6))
    call_with_args(getattr(bf16_lib, cupy_lean.bf16_name(True, device_constants)), args)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, ours))


def _half_grad(arrays, fmt, seed):
    """The case with half params: the gradient as half bits of format ``fmt``, and a half param to write."""
    grad = arrays[1].astype(np.float16).view(np.uint16) if fmt == lowp.FLOAT16 else \
        (arrays[1].view(np.uint32) >> 16).astype(np.uint16)
    half_param = np.random.default_rng(seed).integers(0, 2**16, arrays[0].size).astype(np.uint16)
    return [arrays[0], grad, *arrays[2:]], half_param


@pytest.mark.parametrize("device_constants", [False, True], ids=["scalars", "device-constants"])
@pytest.mark.parametrize("fmt", [lowp.BFLOAT16, lowp.FLOAT16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["int8", "bf16-stochastic", "bf16-nearest"])
def test_master_sources_are_the_host_kernels_bit_for_bit(int8_lib, bf16_lib, kind, fmt, device_constants):
    """Half params with float32 masters (``/master``): the half gradient widened, the master stepped,
    the half param written (rounded to nearest even), the moments as with float32 params; bit for bit
    the Numba host kernels given the same ``rounding`` and half param."""
    n = 3 * L.BLOCK + 40
    c = _constants(8)
    rounding = (fmt, 0, 0, 0, 0)
    if kind == "int8":
        arrays, half_param = _half_grad(_int8_case(8, n), fmt, 9)
    else:
        arrays, half_param = _half_grad(_bf16_case(8, n), fmt, 9)
        state_rounding = (int(kind == "bf16-stochastic"), 5, 6)
    ours, numba = [a.copy() for a in arrays], [a.copy() for a in arrays]
    ours_half, numba_half = half_param.copy(), half_param.copy()
    passed = _pass_constants(c, device_constants)
    host_c = tuple(np.float32(x) for x in c)
    if kind == "int8":
        args = cupy_lean.int8_args(tuple(ours), passed, MAPS, rounding, ours_half)
        call_with_args(getattr(int8_lib, cupy_lean.int8_name(device_constants, master=True)), args)
        lean_cpu.KERNELS["adam/int8"](*numba, host_c, rounding, numba_half)
    else:
        args = cupy_lean.bf16_args(tuple(ours), passed, state_rounding, rounding, ours_half)
        name = cupy_lean.bf16_name(bool(state_rounding[0]), device_constants, master=True)
        call_with_args(getattr(bf16_lib, name), args)
        lean_cpu.KERNELS["adam/bf16state"](*numba, host_c, state_rounding, rounding, numba_half)
    for got, want in zip([*ours, ours_half], [*numba, numba_half]):
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert not np.array_equal(ours[0], arrays[0])  # it did step
    half = np.dtype(np.float16) if fmt == lowp.FLOAT16 else np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(ours_half, ours[0].astype(half).view(np.uint16))  # the master, to nearest


#: C parameter types and what CuPy must be handed for each: a NumPy scalar of that width by value
C_SCALARS = {"float": np.float32, "unsigned int": np.uint32, "long long": np.int64, "int": np.int32}


def _declared(params: str) -> list:
    """Per C parameter of a kernel, the NumPy array or scalar type its argument must have."""
    out = []
    for param in params.split(","):
        ctype = " ".join(param.split()[:-1]).removeprefix("const ").strip()
        out.append(np.ndarray if ctype.endswith("*") else C_SCALARS[ctype])
    return out


@pytest.mark.parametrize("device_constants", [False, True], ids=["scalars", "device-constants"])
def test_launch_arguments_are_the_kernels_declared_parameters(device_constants):
    """What CuPy gets is the kernels' parameter list, argument for argument: arrays for pointers and
    NumPy scalars of the declared width (CuPy passes a scalar as its dtype), the constants in slot
    order, the seed and counter as lowp's 32-bit words, a 64-bit element count."""
    c = np.arange(N_CONSTANTS, dtype=np.float32)
    passed = _pass_constants(c, device_constants)
    int8 = cupy_lean.int8_args(tuple(_int8_case(5, 300)), passed, MAPS)
    bf16 = cupy_lean.bf16_args(tuple(_bf16_case(5, 300)), passed, (1, -1, 2**32 + 3))
    for args, params in ((int8, cupy_lean.int8_params(device_constants)),
                         (bf16, cupy_lean.bf16_params(device_constants))):
        assert [np.ndarray if isinstance(a, np.ndarray) else type(a) for a in args] == _declared(params)
        assert args[-1] == 300
    # with half params: the same, then the half param and its format
    half_param, rounding = np.zeros(300, np.uint16), (lowp.FLOAT16, 0, 0, 0, 0)
    for args, params in ((cupy_lean.int8_args(tuple(_int8_case(5, 300)), passed, MAPS, rounding, half_param),
                          cupy_lean.int8_params(device_constants, master=True)),
                         (cupy_lean.bf16_args(tuple(_bf16_case(5, 300)), passed, (1, 2, 3), rounding, half_param),
                          cupy_lean.bf16_params(device_constants, master=True))):
        assert [np.ndarray if isinstance(a, np.ndarray) else type(a) for a in args] == _declared(params)
        assert args[-3] == 300 and args[-2] is half_param and args[-1] == lowp.FLOAT16
    assert bf16[-3:-1] == (0xFFFFFFFF, 3)
    if device_constants:
        assert bf16[4] is passed and int8[6] is passed
    else:
        named = [float(k) for k, _ in cupy_lean.NAMED_CONSTANTS["adam"]]
        assert [float(a) for a in bf16[4:-3]] == named == [float(a) for a in int8[6:-len(MAPS) - 1]]


class _HostRawKernel:
    """A ``cupy.RawKernel`` stand-in that runs the kernel's host build with the launch's arguments."""

    def __init__(self, function, launches):
        self.function, self.launches = function, launches

    def __call__(self, grid, block, args):
        self.launches.append((grid, block))
        call_with_args(self.function, args)


@pytest.mark.parametrize("cls,half", [("AdamW", False), ("AdamW", True), ("NAdam", False), ("RAdam", True)],
                         ids=["adamw-float32", "adamw-float16-master", "nadam-float32", "radam-float16-master"])
@pytest.mark.parametrize("state_dtype", ["int8", "bfloat16"])
def test_the_cupy_backend_steps_lean_state_as_numba_cpu(state_dtype, cls, half, int8_libs, bf16_libs, monkeypatch):
    """The whole chain on the host: ``Adam(state_dtype=..., backend="cupy")`` allocates the state and
    readies the maps through the backend, and each step reaches ``cupy_lean``'s launchers and the
    kernels with the arrays, constants and rounding the optimizer passes: the C build of each kernel
    stands in for the RawKernel (CuPy's arrays for NumPy's). The same bits as numba-cpu, every step."""
    launches = []
    rule = cls.lower().removesuffix("w")
    lib = (int8_libs if state_dtype == "int8" else bf16_libs)[rule]
    for name in cupy_lean.KERNELS:
        for d in (False, True):
            kname, _ = cupy_lean.KERNELS[name](d)
            if hasattr(lib, kname):
                monkeypatch.setitem(cupy_lean._kernels, (name, d), _HostRawKernel(getattr(lib, kname), launches))
    readied = []
    monkeypatch.setattr(cupy_lean, "device_maps", lambda: readied.append(1) or MAPS)
    monkeypatch.setattr(cupy_bookkeeping, "_blocks_max", [3])
    be = object.__new__(backends.CuPy)
    be._cupy = types.SimpleNamespace(asarray=np.asarray, zeros=np.zeros, asnumpy=np.array)
    be._lean, be._launch, be._external = cupy_lean, None, {}
    be.copy_from_host = lambda dst, src: np.copyto(dst.reshape(-1), src.reshape(-1))  # the masters' first values
    be.kind = backends.HOST  # NumPy arrays stand in for CuPy's: no device-side bookkeeping
    monkeypatch.setitem(backends._statuses, "cupy", backends.BackendStatus("cupy", True, "host stand-in"))
    monkeypatch.setitem(backends._instances, "cupy", be)
    monkeypatch.setattr(lean, "MIN_SIZE", L.BLOCK)
    rng = np.random.default_rng(7)
    shapes = [(3 * L.BLOCK + 40,), (257, 3)]
    dtype = np.float16 if half else np.float32  # float16: float32 masters, the /master kernels
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    kw = {"lr": 1e-2, "weight_decay": 0.01, "state_dtype": state_dtype, "seed": 99, "master_weights": half}
    ours, cpu = [p.copy() for p in p0], [p.copy() for p in p0]
    opt = getattr(gpuadam, cls)(ours, backend="cupy", **kw)
    ref = getattr(gpuadam, cls)(cpu, backend="numba-cpu", **kw)
    assert len(readied) == (2 if state_dtype == "int8" else 0) and not launches
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opt.step(grads)
        ref.step(grads)
        for got, want in zip(ours, cpu):
            np.testing.assert_array_equal(got, want)
        for i in range(len(shapes)):
            for name in (*lean.NAMES[state_dtype], *(("master",) if half else ())):
                assert np.array_equal(opt.state[i][name], ref.state[i][name]), name
    assert len(launches) == 3 * len(shapes)
    if state_dtype == "int8":  # one thread block of BLOCK threads per quantisation block
        assert launches[0] == ((-(-shapes[0][0] // L.BLOCK),), (L.BLOCK,))
    assert not np.array_equal(ours[0], p0[0])

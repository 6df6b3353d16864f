"""The update rules as CUDA C snippets, wrapped as ``cupy.ElementwiseKernel``.

The snippets are the rules' own (``Rule.snippet``, the one other copy of each element function,
beside it in ``kernels.rules``): each does exactly the operations of its element function, in the
same order and with the same association, on the type placeholder ``T`` so one text serves
float32 and float64, and float16/bfloat16 storage with float32 math (``HALF_LAYOUTS``, conversions from ``cupy_lowp``).
``tests/test_cupy_snippets_host.py`` compiles the very same strings with g++ and checks them against
``gpuadam.reference``, and compiles ``cuda_source`` to PTX; ``tests/test_cupy_half_host.py`` runs
the half-precision ``cuda_source`` on the host against the Numba CPU half kernels.

``operation`` reads every element into a local by value, runs the snippet on the locals and stores
each output once after it, at ``opaque_index(i)`` (``INDEX_SOURCE`` says why). Locals, not
references into the arrays: the compiler cannot prove the arrays distinct, so through references a
store to ``m`` before ``g`` is last read would force a second load of ``g``.

The arrays are ``raw`` parameters indexed by CuPy's loop index ``i``; ``launch`` passes ``size``.
With non-raw parameters CuPy indexes every array through its strides in 32-bit arithmetic (its
choice below 2**31 elements), which costs registers past full occupancy (figures: BENCHMARKS.md,
"Why the kernels look as they do").

Nothing here imports CuPy at module level: ``SNIPPETS`` and ``cuda_source`` work on a machine
without CuPy or a GPU; the ``ElementwiseKernel`` objects are built at first use. Compiling the
source to PTX (NVRTC or nvcc) is inspection, in ``gpuadam.machine_code``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from gpuadam.kernels.cupy_lowp import FN_SOURCE, LOWP_SOURCE
from gpuadam.kernels.rules import RULES, slot_names

#: The CUDA C body of each rule for one element, by rule name (``Rule.snippet``).
SNIPPETS = {name: rule.snippet for name, rule in RULES.items()}

#: Per rule: the arrays only read, and the arrays read and written in place.
INPUTS = {name: ("g",) for name in RULES}
OUTPUTS = {name: ("p", *rule.arrays[2:]) for name, rule in RULES.items()}


@functools.cache
def constant_params(rule: str) -> tuple[tuple[int, str], ...]:
    """``(index in the constants tuple, name)`` of each scalar parameter of ``rule``'s kernel: the
    entries of its layout that its snippet reads."""
    names = slot_names(RULES[rule].layout)
    return tuple((k, n) for k, n in enumerate(names) if n and re.search(rf"\b{n}\b", SNIPPETS[rule]))


# Every kernel's stores index through ``opaque_index(i)``, a copy of ``i`` the optimizer cannot see
# through. Indexed by ``i`` itself, each array's 64-bit address is kept live from its load across
# the sqrt/div slow-path calls to its store, or strength-reduced into a pointer carried around the
# loop: two registers per array, which with the constants also held in registers (device
# constants) pushed the float32 and half kernels past full occupancy. Recomputed after the math, for
# a few integer instructions per element, every float32 and half kernel fits in 32, device constants
# included (figures: BENCHMARKS.md, "Why the kernels look as they do").
INDEX_SOURCE = FN_SOURCE + r"""
GPUADAM_FN ptrdiff_t opaque_index(ptrdiff_t i) {
#ifdef __CUDA_ARCH__
  asm("mov.b64 %0, %0;" : "+l"(i));
#endif
  return i;
}
"""


# ---------------------------------------------------------------------------------------------
# Half-precision storage (``kernels.lowp``): the same snippets in float32 math on 16-bit storage,
# in one of two layouts, as the Numba kernels have them:
#   "half"    every array holds half bits; the param is rounded as ``lowp.store_param`` says
#             (to nearest even, or stochastically for bfloat16), the state to nearest even;
#   "master"  the param is a float32 master with float32 state, the gradient holds half bits, and
#             the half param (``half_param``) gets the new master rounded to nearest even in the
#             same pass.
# Each element is read BY VALUE into a float local widened from its storage, the snippet runs on
# the locals, and each output is stored once after it: the snippet text stays the one of float32.
# On the host (g++, no contraction) the result is bit for bit the Numba CPU loops'; on a GPU, NVRTC
# fuses multiply-adds and CuPy's -ftz=true makes float32 (and bfloat16) subnormals zero in the math,
# as for the float32 kernels, so the last bit may differ there.

HALF_LAYOUTS = ("half", "master")

#: The half format and stochastic rounding's ``(stochastic, seed, counter, index_base)``: ``lowp``'s
#: ``rounding``;
#: a master kernel always rounds to nearest even and takes the format only.
_HALF_SCALARS = {"half": (("int32", "fmt"), ("int32", "stochastic"), ("uint32", "seed"), ("uint32", "counter"),
                          ("uint32", "index_base")),
                 "master": (("int32", "fmt"),)}

#: C spelling of the CuPy type names the kernels use ("T" is CuPy's type placeholder).
_C_NAMES = {"T": "T", "float32": "float", "uint16": "unsigned short", "int32": "int", "uint32": "unsigned int"}

# CuPy resolves a type placeholder from arrays only, never from scalars, and no array of the half
# layout is float32: the half kernels name only concrete types, and T (the snippets' type) is
# float by this preamble.
HALF_PREAMBLE = LOWP_SOURCE + "typedef float T;\n\n" + INDEX_SOURCE


def _check_layout(layout: str | None) -> None:
    if layout is not None and layout not in HALF_LAYOUTS:
        raise ValueError(f"layout: expected None or one of {HALF_LAYOUTS}, got {layout!r}")


def kernel_params(rule: str, device_constants: bool = False,
                  layout: str | None = None) -> tuple[tuple[tuple[bool, str, str], ...], ...]:
    """``(inputs, outputs)`` of the rule's kernel, each parameter ``(raw, CuPy type, name)``: the
    gradient, the constants (scalars, or the device array ``c``) and the half format's scalars in;
    the param and the state (and a master kernel's half param) out, written in place."""
    _check_layout(layout)
    half, f32 = ("uint16", "float32") if layout else ("T", "T")
    ins = [(True, half, f"raw_{n}") for n in INPUTS[rule]]
    ins += [(True, f32, "c")] if device_constants else [(False, f32, n) for _, n in constant_params(rule)]
    ins += [(False, t, n) for t, n in _HALF_SCALARS.get(layout, ())]
    outs = [(True, half if layout == "half" else f32, f"raw_{n}") for n in OUTPUTS[rule]]
    outs += [(True, "uint16", "raw_half_param")] if layout == "master" else []
    return tuple(ins), tuple(outs)


_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def kernel_name(rule: str, device_constants: bool = False, layout: str | None = None) -> str:
    return f"gpuadam_{rule}" + (f"_{layout}" if layout else "") + ("_dc" if device_constants else "")


def parse_kernel(kernel: str) -> tuple[str, bool, str | None]:
    """``(rule, device_constants, layout)`` of a kernel named ``rule[/half|/master][/device-constants]``
    (the names of ``gpuadam inspect``)."""
    rule, *variants = kernel.split("/")
    device_constants = variants[-1:] == ["device-constants"]
    layouts = variants[:-1] if device_constants else variants
    if rule not in SNIPPETS or len(layouts) > 1 or (layouts and layouts[0] not in HALF_LAYOUTS):
        raise ValueError(f"unknown CuPy kernel {kernel!r}: expected RULE[/half|/master][/device-constants] "
                         f"with RULE one of {', '.join(SNIPPETS)}")
    return rule, device_constants, layouts[0] if layouts else None


def operation(rule: str, device_constants: bool = False, layout: str | None = None) -> str:
    """The kernel body: each array's element ``i`` read into a local, ``SNIPPETS[rule]``, then each
    output stored once at ``opaque_index(i)`` (``INDEX_SOURCE``).

    float32/float64: the locals are of ``T``. Half storage (``layout``): each element widened to a
    float local, and each output rounded to its storage once.
    """
    _check_layout(layout)
    store = ["const ptrdiff_t i_store = opaque_index(i);\n"]  # see INDEX_SOURCE
    if layout is None:
        bind = [f"const T {n} = raw_{n}[i];\n" for n in INPUTS[rule]]
        bind += [f"T {n} = raw_{n}[i];\n" for n in OUTPUTS[rule]]
        store += [f"raw_{n}[i_store] = {n};\n" for n in OUTPUTS[rule]]
        return "".join(bind) + SNIPPETS[rule] + "".join(store)
    bind = [f"const T {n} = lowp_load_half(raw_{n}[i], fmt);\n" for n in INPUTS[rule]]
    if layout == "half":
        bind += [f"T {n} = lowp_load_half(raw_{n}[i], fmt);\n" for n in OUTPUTS[rule]]
        # the element's index in the whole buffer seeds stochastic rounding: modulo 2**32, as lowp masks it
        store += ["raw_p[i_store] = lowp_store_param(p, fmt, stochastic, seed, counter, "
                  "static_cast<unsigned int>(i_store) + index_base);\n"]
        store += [f"raw_{n}[i_store] = lowp_store_half({n}, fmt);\n" for n in OUTPUTS[rule] if n != "p"]
    else:
        bind += [f"T {n} = raw_{n}[i];\n" for n in OUTPUTS[rule]]
        store += [f"raw_{n}[i_store] = {n};\n" for n in OUTPUTS[rule]]
        store += ["raw_half_param[i_store] = lowp_store_half(p, fmt);\n"]
    return "".join(bind) + SNIPPETS[rule] + "".join(store)


def loop_prep(rule: str, device_constants: bool) -> str:
    """Code before the element loop: with ``device_constants``, the constants read once from the
    device array ``c`` (written on the device for clipping, skipping, capturable) under the names
    the snippet uses. Inside the loop they would be re-read per element: the compiler cannot tell
    ``c`` from the arrays the loop writes."""
    return "".join(f"const T {n} = c[{k}];\n" for k, n in constant_params(rule)) if device_constants else ""


def elementwise_params(rule: str, device_constants: bool = False, layout: str | None = None) -> tuple[str, str]:
    """``(in_params, out_params)`` of the rule's ElementwiseKernel: g and the constants in, state out."""
    ins, outs = kernel_params(rule, device_constants, layout)
    return tuple(", ".join(("raw " if raw else "") + f"{t} {n}" for raw, t, n in ps) for ps in (ins, outs))


def _ctype(dtype: Any) -> str:
    try:
        return _CTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"the CuPy kernels compute in float32 or float64, not {np.dtype(dtype)}") from None


def _check_half_dtype(dtype: Any, layout: str | None) -> None:
    if layout is not None and np.dtype(dtype) != np.float32:
        raise TypeError(f"the {layout} kernels compute in float32, not {np.dtype(dtype)}")


def cuda_source(rule: str, dtype: Any, device_constants: bool = False, layout: str | None = None) -> tuple[str, str]:
    """``(kernel_name, source)``: the complete CUDA C++ kernel CuPy builds from ``SNIPPETS[rule]``.

    A self-contained equivalent of what ``ElementwiseKernel`` generates (``cupy_generated_source``
    gives CuPy's own text; the tests check both compile to the same PTX loop, or for half storage
    to the same arithmetic and memory instructions): the ``T`` typedef and ``INDEX_SOURCE`` (half
    storage: ``HALF_PREAMBLE``), an ``extern "C"`` grid-stride loop over ``ptrdiff_t i`` that is
    not unrolled, and ``operation``. Plain pointers stand in for CuPy's ``CArray`` and ``CIndexer`` structs, whose
    indexing of a contiguous array is ``data_[i]``, so the source compiles without CuPy's headers.
    """
    ctype, name = _ctype(dtype), kernel_name(rule, device_constants, layout)
    _check_half_dtype(dtype, layout)
    ins, outs = kernel_params(rule, device_constants, layout)
    params = [f"const {_C_NAMES[t]}{'*' if raw else ''} {n}" for raw, t, n in ins]
    params += [f"{_C_NAMES[t]}* {n}" for _, t, n in outs]
    prep = "".join(f"  {line}\n" for line in loop_prep(rule, device_constants).splitlines())
    body = "".join(f"    {line}\n" for line in operation(rule, layout=layout).splitlines())
    head = HALF_PREAMBLE if layout else f"typedef {ctype} T;\n" + INDEX_SOURCE
    source = f"""{head}
extern "C" __global__ void {name}({", ".join(params)}, const ptrdiff_t _n) {{
{prep}  #pragma unroll 1
  for (ptrdiff_t i = static_cast<ptrdiff_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < _n;
       i += static_cast<ptrdiff_t>(blockDim.x) * gridDim.x) {{
{body}  }}
}}
"""
    return name, source


# ---------------------------------------------------------------------------------------------
# CuPy: the kernels themselves, and CuPy's own generated source (needs CuPy, not a GPU)

_kernels: dict[tuple, Any] = {}


def elementwise_kernel(rule: str, device_constants: bool = False, layout: str | None = None) -> Any:
    """The rule's ``cupy.ElementwiseKernel``, built once; CuPy compiles it per dtype at first call."""
    key = (rule, device_constants, layout)
    kernel = _kernels.get(key)
    if kernel is None:
        import cupy

        ins, outs = elementwise_params(rule, device_constants, layout)
        kernel = _kernels[key] = cupy.ElementwiseKernel(
            ins, outs, operation(rule, layout=layout), name=kernel_name(rule, device_constants, layout),
            no_return=True, preamble=HALF_PREAMBLE if layout else INDEX_SOURCE,
            loop_prep=loop_prep(rule, device_constants),
        )
    return kernel


def launch(rule: str, arrays: tuple, c: tuple, *extra) -> None:
    """Run ``rule`` in place on 1-D CuPy arrays ``(p, g, *state)`` with constants ``c``.

    ``c`` holds NumPy scalars of the arrays' dtype (float32 for half storage), or is a device array
    of that dtype (``on_device.DeviceSteps``). The state arrays are passed as the outputs, so CuPy
    allocates nothing and writes them in place; with only raw arrays CuPy takes the loop length
    from ``size`` (shapes were validated upstream).

    Half storage (``rule`` ``NAME/half``, as the Numba kernels are named) passes ``extra =
    (rounding, half_param)`` as they take it, ``rounding = (format, stochastic, seed, counter, index_base)``:
    uint16 ``p`` is the half param (the "half" layout; ``half_param`` is ``p`` itself), float32
    ``p`` the master of ``half_param``.
    """
    base = rule.removesuffix("/half")
    p, g, *state = arrays
    layout, outs, half_scalars = None, (p, *state), ()
    if extra:
        (fmt, stochastic, seed, counter, index_base), half_param = extra
        if p.dtype == np.uint16:
            # seed, counter and index base are lowp's 32-bit words: they wrap as its hash masks them
            layout, half_scalars = "half", (np.int32(fmt), np.int32(stochastic), np.uint32(seed & 0xFFFFFFFF),
                                            np.uint32(counter & 0xFFFFFFFF),
                                            np.uint32(index_base & 0xFFFFFFFF))
        else:
            layout, half_scalars, outs = "master", (np.int32(fmt),), (p, *state, half_param)
    if not isinstance(c, tuple):  # constants written on the device: any CUDA array of T
        import cupy

        elementwise_kernel(base, True, layout)(g, cupy.asarray(c), *half_scalars, *outs, size=p.size)
        return
    scalars = [c[k] for k, _ in constant_params(base)]
    elementwise_kernel(base, False, layout)(g, *scalars, *half_scalars, *outs, size=p.size)


#: CuPy compiles every kernel with ``-ftz=true`` (``cupy.cuda.compiler`` adds it): float32 subnormals
#: are zero in the math. ``cupy_generated_source`` passes it on, and ``machine_code`` compiles with it
#: so that the PTX inspected is the PTX CuPy runs.
FTZ_OPTION = "-ftz=true"


def cupy_generated_source(kernel: str, dtype: Any, index_32_bits: bool = True) -> tuple[str, str, tuple]:
    """``(kernel_name, source, options)``: the kernel exactly as CuPy generates and compiles it.

    ``kernel`` is a rule name with the variants of ``parse_kernel``. Calls CuPy's private code
    generator (``cupy._core._kernel``, checked with CuPy 14.2), which needs CuPy importable but no
    GPU, with the arguments ``launch`` passes: 1-D C-contiguous arrays and NumPy scalars.
    ``index_32_bits`` is CuPy's choice for arrays below 2**31 elements. The options are CuPy's
    include paths and flags plus the ``-ftz=true`` its compiler adds; the architecture is the
    caller's. Private API: the tests compare it with ``cuda_source``.
    """
    from cupy import ndarray
    from cupy._core import _carray, _kernel, core

    rule, device_constants, layout = parse_kernel(kernel)
    _ctype(dtype)
    _check_half_dtype(dtype, layout)
    scalar = np.dtype(dtype).type
    array_kind, indexer_kind, scalar_kind = 1, 2, 3  # _ArgKind in cupy/_core/_kernel.pyx
    args = []
    for raw, t, _ in (p for ps in kernel_params(rule, device_constants, layout) for p in ps):
        typ = scalar if t == "T" else np.dtype(t).type
        args.append(_kernel._ArgInfo(array_kind, ndarray, typ, 1, True, index_32_bits) if raw
                    else _kernel._ArgInfo(scalar_kind, typ, typ, 0, True, True))
    args.append(_kernel._ArgInfo(indexer_kind, _carray.Indexer, None, 1, True, index_32_bits))
    k = elementwise_kernel(rule, device_constants, layout)
    type_map = _kernel._TypeMap(() if layout else (("T", scalar),))
    code = _kernel._get_elementwise_kernel_code(
        tuple(args), type_map, k.params, k.operation, k.name, k.preamble, k.kwargs.get("loop_prep", ""),
    )
    header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    options = tuple(core.assemble_cupy_compiler_options(())) + (FTZ_OPTION,)
    return k.name, header + code, options

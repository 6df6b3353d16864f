"""The peers, each only when installed: NumPy at its best, PyTorch foreach and fused, optax
under ``jax.jit``, DeepSpeed's CPU Adam."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gpuadam.bench.cases import Case, Implementation
from gpuadam.bench.problems import CPU, GPU, NUMPY_BLOCK, STATE_NAMES, Problem, is_half


class NumpyPeer(Implementation):
    """NumPy at its best: in place, ``out=`` everywhere, blocked so the scratch stays in cache.

    NumPy ufuncs are binary, so an expression of a dozen operations needs scratch space: two
    blocks of ``NUMPY_BLOCK`` elements, allocated once (nothing the size of the parameters).
    Single-threaded, as NumPy's elementwise ufuncs are.
    """

    name = "numpy (in place, blocked)"
    backend = "numpy"

    def unavailable(self, problem: Problem) -> str | None:
        if problem.dtype.name == "bfloat16":
            try:
                import ml_dtypes  # noqa: F401
            except ImportError:
                return "bfloat16 on the host needs ml_dtypes"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _NumpyCase(problem)


def numpy_adam(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, vmax: np.ndarray | None,
               c: tuple, s1: np.ndarray, s2: np.ndarray) -> None:
    """One Adam step in place with the kernels' constants ``c``, block by block through ``s1, s2``."""
    # The layout of kernels.rules; entries past the eleventh (e.g. a skip flag) are not needed here.
    grad_mul, wd_l2, b1, omb1, b2, omb2, decay, step_size, inv_sqrt_bc2, eps, eps_root_bc2 = c[:11]
    plain_grad = grad_mul == 1 and wd_l2 == 0
    for lo in range(0, p.size, s1.size):
        hi = min(p.size, lo + s1.size)
        pb, gb, mb, vb = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
        t1, t2 = s1[: hi - lo], s2[: hi - lo]
        if not plain_grad:  # the gradient with sign and L2 decay folded in
            np.multiply(gb, grad_mul, out=t1)
            np.multiply(pb, wd_l2, out=t2)
            gb = np.add(t1, t2, out=t1)
        mb *= b1
        mb += np.multiply(gb, omb1, out=t2)
        vb *= b2
        np.multiply(gb, gb, out=t2)
        t2 *= omb2
        vb += t2
        if vmax is not None:
            vb = np.maximum(vmax[lo:hi], vb, out=vmax[lo:hi])
        if eps_root_bc2:
            np.sqrt(np.add(vb, eps_root_bc2, out=t2), out=t2)
        else:
            np.sqrt(vb, out=t2)
        t2 *= inv_sqrt_bc2
        t2 += eps
        np.divide(mb, t2, out=t2)
        t2 *= step_size
        if decay != 1:
            pb *= decay
        pb -= t2


class _NumpyCase(Case):
    """Half storage: each block widened to float32 scratch, stepped there, rounded back (NumPy's and
    ml_dtypes' casts round to nearest even); with master weights only g is widened and p rounded."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.p = problem.p0.copy()
        self.g = problem.g1.copy()
        self.st = {name: np.zeros(problem.n, problem.storage(name)) for name in problem.spec.state}
        if problem.master:
            self.st["w"] = problem.p0.astype(np.float32)
        block = min(NUMPY_BLOCK, max(problem.sizes))
        compute = problem.compute_dtype
        self.s1, self.s2 = np.empty(block, compute), np.empty(block, compute)
        # the arrays the math reads, in the order numpy_adam takes them; the master stands in for p
        self.names = ("w" if problem.master else "p", "g", "m", "v", "vmax")
        self.wide = {name: np.empty(block, compute) for name in self.names
                     if self._array(name) is not None and is_half(self._array(name).dtype)}
        self.t = 0

    def _array(self, name: str) -> np.ndarray | None:
        return {"p": self.p, "g": self.g}.get(name, self.st.get(name))

    def step(self, k: int) -> None:
        self.t += 1
        problem = self.problem
        c = problem.spec.hyper.constants(self.t, problem.compute_dtype)
        arrays = [self._array(name) for name in self.names]
        for lo, hi in zip(*_bounds(problem.sizes, self.s1.size)):
            blocks = [None if a is None else a[lo:hi] for a in arrays]
            if self.wide:
                for j, name in enumerate(self.names):
                    if name in self.wide:
                        blocks[j] = _widen(blocks[j], self.wide[name][: hi - lo])
            numpy_adam(*blocks, c, self.s1, self.s2)
            for j, name in enumerate(self.names):
                if name in self.wide and name != "g":
                    np.copyto(arrays[j][lo:hi], blocks[j], casting="unsafe")
            if problem.master:
                np.copyto(self.p[lo:hi], blocks[0], casting="unsafe")

    def set_grad(self, g: np.ndarray) -> None:
        np.copyto(self.g, g)

    def state(self) -> dict[str, np.ndarray]:
        return {"p": self.p, **self.st}


def _bounds(sizes: tuple[int, ...], block: int) -> tuple[list[int], list[int]]:
    """Block bounds that never cross a tensor boundary: each tensor is stepped on its own."""
    los, his, start = [], [], 0
    for size in sizes:
        for lo in range(start, start + size, block):
            los.append(lo)
            his.append(min(start + size, lo + block))
        start += size
    return los, his


def _widen(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.copyto(out, x, casting="unsafe")
    return out


#: How a user gets the peers that are missing.
BENCH_EXTRA = "pip install 'gpuadam[bench]'"


def not_importable(what: str, exc: BaseException) -> str:
    """Why a peer cannot run: not installed (and how to get it), or its import's own words."""
    if isinstance(exc, ModuleNotFoundError):
        return f"{what} not installed: {BENCH_EXTRA}"
    return f"{what} not importable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"


def import_torch() -> Any:
    import torch

    return torch


def _to_torch(torch: Any, x: np.ndarray) -> Any:
    """A CPU tensor holding a copy of ``x`` (bfloat16 through its bits: NumPy has no such type)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def _from_torch(torch: Any, t: Any) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchPeer(Implementation):
    """``torch.optim.Adam``/``AdamW`` with ``foreach=True`` or ``fused=True``."""

    backend = "torch"

    def __init__(self, mode: str, device: str) -> None:
        self.mode, self.torch_device = mode, device
        self.device = CPU if device == "cpu" else GPU
        self.name = f"torch {mode} ({device})"
        self.launches = "one" if mode == "fused" else "grouped"
        self.half_arithmetic = mode == "foreach"  # fused computes half params in float32, as we do

    def unavailable(self, problem: Problem) -> str | None:
        try:
            torch = import_torch()
        except Exception as exc:
            return not_importable("torch", exc)
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            return "torch has no CUDA device here"
        if problem.master:
            return "torch.optim keeps no float32 master weights (its half params keep half state)"
        h = problem.spec.hyper
        if h.eps_root or not h.bias_correction:
            return "torch.optim.Adam has no eps_root and always corrects the bias"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _TorchCase(self, problem, sets)


class _TorchCase(Case):
    def __init__(self, impl: TorchPeer, problem: Problem, sets: int) -> None:
        torch = self.torch = import_torch()
        self.problem, self.sets, self.device = problem, sets, impl.torch_device
        self.events = "torch" if impl.torch_device == "cuda" else None
        self.params, self.opts = [], []
        for _ in range(sets):
            params = []
            for p, g in zip(problem.split(problem.p0), problem.split(problem.g1)):
                t = torch.nn.Parameter(_to_torch(torch, p).to(self.device))
                t.grad = _to_torch(torch, g).to(self.device)
                params.append(t)
            self.params.append(params)
            self.opts.append(self.optimizer(impl, params))

    def optimizer(self, impl: TorchPeer, params: list) -> Any:
        torch, h = self.torch, self.problem.spec.hyper
        cls = torch.optim.AdamW if self.problem.spec.name == "adamw" else torch.optim.Adam
        return cls(params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad,
                   maximize=h.maximize, **{impl.mode: True})

    def step(self, k: int) -> None:
        self.opts[k].step()

    def set_grad(self, g: np.ndarray) -> None:
        for t, part in zip(self.params[0], self.problem.split(g)):
            t.grad.copy_(_to_torch(self.torch, part))

    def state(self) -> dict[str, np.ndarray]:
        def host(ts: Sequence[Any]) -> np.ndarray:
            return np.concatenate([_from_torch(self.torch, t).reshape(-1) for t in ts])

        opt, params = self.opts[0], self.params[0]
        out = {"p": host(params)}
        for name, short in STATE_NAMES.items():
            if name in opt.state[params[0]]:
                out[short] = host([opt.state[t][name] for t in params])
        return out

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


class OptaxPeer(Implementation):
    """``optax.adam``/``adamw`` under ``jax.jit`` with the params and state buffers donated."""

    backend = "optax"

    def __init__(self, device: str) -> None:
        self.jax_device = device
        self.device = CPU if device == "cpu" else GPU
        self.name = f"optax (jax.jit, donated, {device})"
        self.launches = "one (XLA fuses)"
        self.half_arithmetic = True  # its moments and update in the params' dtype

    def unavailable(self, problem: Problem) -> str | None:
        try:
            import jax
            import optax  # noqa: F401
        except Exception as exc:
            return not_importable("jax/optax", exc)
        if self.jax_device == "gpu" and not any(d.platform == "gpu" for d in jax.devices()):
            return "jax has no GPU here"
        if problem.master:
            return "optax.adam keeps no float32 master weights (its moments take the params' dtype)"
        h = problem.spec.hyper
        if h.amsgrad:  # optax.amsgrad keeps the max of the bias-corrected nu, PyTorch of the raw one
            return "optax's AMSGrad is a different algorithm (max of the bias-corrected second moment)"
        if h.maximize or not h.bias_correction or (h.weight_decay and not h.decoupled_weight_decay):
            return "optax.adam has no maximize, L2 decay or bias_correction=False"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _OptaxCase(self, problem, sets)


class _OptaxCase(Case):
    def __init__(self, impl: OptaxPeer, problem: Problem, sets: int) -> None:
        import jax
        import optax

        if problem.dtype == np.float64:
            jax.config.update("jax_enable_x64", True)
        self.jax, self.problem, self.sets = jax, problem, sets
        device = next(d for d in jax.devices() if d.platform == impl.jax_device)
        h = problem.spec.hyper
        if problem.spec.name == "adamw":
            tx = optax.adamw(h.lr, h.beta1, h.beta2, h.eps, h.eps_root, weight_decay=h.weight_decay)
        else:
            tx = optax.adam(h.lr, h.beta1, h.beta2, h.eps, h.eps_root)

        def step(params: Any, state: Any, grads: Any) -> tuple:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self._step = jax.jit(step, donate_argnums=(0, 1))

        def put(x: np.ndarray) -> list:
            return [jax.device_put(part, device) for part in problem.split(x)]

        self.params = [put(problem.p0) for _ in range(sets)]
        self.states = [tx.init(p) for p in self.params]
        self.grads = [put(problem.g1) for _ in range(sets)]
        self.put = put

    def step(self, k: int) -> None:
        self.params[k], self.states[k] = self._step(self.params[k], self.states[k], self.grads[k])

    def set_grad(self, g: np.ndarray) -> None:
        self.grads[0] = self.put(g)

    def state(self) -> dict[str, np.ndarray]:
        adam = next(s for s in self.states[0] if hasattr(s, "mu"))

        def host(xs: Sequence[Any]) -> np.ndarray:
            return np.concatenate([np.asarray(x).reshape(-1) for x in xs])

        return {"p": host(self.params[0]), "m": host(adam.mu), "v": host(adam.nu)}

    def sync(self) -> None:
        self.jax.block_until_ready(self.params)


class DeepSpeedPeer(Implementation):
    """DeepSpeed's ``DeepSpeedCPUAdam`` (its C++ AVX op, built by DeepSpeed on first use)."""

    name = "deepspeed cpu_adam"
    backend = "deepspeed"
    launches = "one call per group"
    # DeepSpeed forms 1 - beta2 in float32 from float32(beta2): 1.3e-5 relative error in v (about
    # 100 ulps), an error of constants, not of the algorithm; a wrong rule is off by far more.
    tolerance_eps = 512
    note = "checked at 512 eps, not 4: it rounds beta2 to float32 before 1 - beta2 (v off by 1.3e-5 relative)"

    def unavailable(self, problem: Problem) -> str | None:
        try:
            import deepspeed.ops.adam  # noqa: F401
        except Exception as exc:
            return not_importable("deepspeed", exc)
        h = problem.spec.hyper
        if h.amsgrad or h.maximize or h.eps_root or not h.bias_correction:
            return "DeepSpeedCPUAdam has no amsgrad, maximize or eps_root"
        if problem.dtype != np.float32:
            return "DeepSpeedCPUAdam keeps float32 parameters"
        return None

    def setup(self, problem: Problem, sets: int) -> Case:
        return _DeepSpeedCase(problem)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what C++ code prints to stdout (DeepSpeed's banner) to stderr, away from the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _DeepSpeedCase(_TorchCase):
    def __init__(self, problem: Problem) -> None:
        import logging

        torch = self.torch = import_torch()
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        with _stdout_to_stderr():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.problem, self.sets, self.device, self.events = problem, 1, "cpu", None
            h = problem.spec.hyper
            params = []
            for p, g in zip(problem.split(problem.p0), problem.split(problem.g1)):
                t = torch.nn.Parameter(torch.from_numpy(p.copy()))
                t.grad = torch.from_numpy(g.copy())
                params.append(t)
            self.params = [params]
            self.opts = [DeepSpeedCPUAdam(
                params, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay,
                adamw_mode=h.decoupled_weight_decay, bias_correction=h.bias_correction,
            )]


def peer_implementations(devices: set[str]) -> list[Implementation]:
    """Every peer for the devices benchmarked; those not installed report themselves unavailable."""
    peers: list[Implementation] = []
    if CPU in devices:
        peers += [NumpyPeer(), TorchPeer("foreach", "cpu"), TorchPeer("fused", "cpu"), OptaxPeer("cpu"),
                  DeepSpeedPeer()]
    if GPU in devices:
        peers += [TorchPeer("foreach", "cuda"), TorchPeer("fused", "cuda"), OptaxPeer("gpu")]
    return peers

"""One rank of the sharded-optimizer checks (``tests/test_distributed.py`` launches it).

Usage: ``mpiexec -n 4 python tests/distributed_worker.py mpi DIR`` or, per rank, with
``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` set, ``python ... torch DIR``. Every rank
runs every check; each check compares the params of the sharded run, bit for bit, with a plain
optimizer stepped in this process on the exact sum of all ranks' gradients (small multiples of
1/64: every sum is exact, so reduction order cannot matter). A rank that fails prints why and the
run exits non-zero; rank 0 writes ``DIR/passed`` listing the checks that passed on every rank.
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np

import gpuadam
from gpuadam.distributed import ShardedOptimizer, ShardLayout, communicator

SHAPES = [(5, 7), 33, 1, (2, 3, 4)]


def grads_of(buf: gpuadam.FlatBuffer, case: int, rank: int, step: int, dtype=np.float32) -> gpuadam.FlatBuffer:
    g = gpuadam.FlatBuffer(buf.shapes, dtype)
    rng = np.random.default_rng([case, rank, step])
    for v in g.views:
        v[...] = (rng.integers(-64, 64, v.shape) / 64).astype(dtype)
    return g


def summed(buf: gpuadam.FlatBuffer, case: int, ranks: list[int], step: int, dtype=np.float32) -> gpuadam.FlatBuffer:
    total = np.zeros(buf.size, np.float64)
    for r in ranks:
        total += grads_of(buf, case, r, step, dtype).data.astype(np.float64)
    out = gpuadam.FlatBuffer(buf.shapes, dtype)
    out.data[...] = total.astype(dtype)
    return out


def start(shapes, dtype=np.float32) -> gpuadam.FlatBuffer:
    buf = gpuadam.FlatBuffer(shapes, dtype)
    rng = np.random.default_rng(99)
    for v in buf.views:
        v[...] = rng.standard_normal(v.shape).astype(dtype)
    return buf


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


class Checks:
    def __init__(self, comm, world, directory: str) -> None:
        self.comm = comm  # the engine's own communicator (MPI.Comm, or the torch.distributed module)
        self.world = world  # its adapter
        self.rank, self.size = world.rank, world.size
        self.dir = directory
        self.passed: list[str] = []

    def same_on_every_rank(self, a: np.ndarray) -> None:
        """Every rank holds the bits of ``a`` (a checksum each way would hide nothing the data shows)."""
        mine = bits(a).astype(np.float64)
        total = self.world.sum_host(mine)
        assert np.array_equal(total, mine * self.size), "params differ between ranks"

    # --- stepping -------------------------------------------------------------------------
    def stepping(self, case: int, cls, kw: dict, *, average=True, step_kw=None, shapes=SHAPES, steps=3,
                 dtype=np.float32, nan_at: int | None = None) -> None:
        step_kw = step_kw or {}
        buf = start(shapes, dtype)
        ref = gpuadam.FlatBuffer.from_arrays(buf.views)
        opt = ShardedOptimizer(cls, buf, self.comm, average=average, **kw)
        plain = cls(ref.views, **kw)
        everyone = list(range(self.size))
        for t in range(steps):
            g = grads_of(buf, case, self.rank, t, dtype)
            total = summed(buf, case, everyone, t, dtype)
            if nan_at == t:
                total.data[3] = np.nan
                if self.rank == self.size - 1:  # one rank's NaN: every rank must skip
                    g.data[3] = np.nan
            opt.step(g, **step_kw)
            scale = step_kw.get("grad_scale", 1.0) * (self.size if average else 1)
            plain.step(total.views, **{**step_kw, "grad_scale": scale})
            assert np.array_equal(bits(buf.data), bits(ref.data)), f"step {t}: sharded != plain"
        self.same_on_every_rank(buf.data)
        assert opt.steps_skipped == plain.steps_skipped == (1 if nan_at is not None else 0)
        assert opt.steps == plain.steps[0]
        layout = ShardLayout.of(buf.size, self.size)
        assert opt.state_nbytes == len(opt.optimizer.state[0]) * layout.length * opt.optimizer.state_dtype(0).itemsize
        assert layout.length * self.size < buf.size + 16 * self.size + layout.length
        if "max_grad_norm" in step_kw:
            assert opt.last_grad_norm == plain.last_grad_norm
        self.passed.append(f"{cls.__name__} {kw} average={average} {step_kw} shapes={shapes} nan_at={nan_at}")

    # --- checkpoints 4 -> 2 -> 1 -> 3 (what the world size allows) ------------------------------
    def resharding(self) -> None:
        case, kw = 7, {"lr": 1e-2, "amsgrad": True}
        buf = start(SHAPES)
        ref = gpuadam.FlatBuffer.from_arrays(buf.views)
        plain = gpuadam.Adam(ref.views, **kw)
        counts = [n for n in (4, 2, 1, 3) if n <= self.size]
        t = 0
        opt = None
        for k, n in enumerate(counts):
            sub = self.split(n)
            if sub is not None:
                mine = ShardedOptimizer(gpuadam.Adam, buf, sub, **kw)
                if k:
                    mine.load(os.path.join(self.dir, f"ck{k - 1}"))
                    assert mine.steps == t
            for _ in range(2):
                if sub is not None:
                    mine.step(grads_of(buf, case, mine.comm.rank, t))
                plain.step(summed(buf, case, list(range(n)), t).views, grad_scale=float(n))
                t += 1
            if sub is not None:
                assert np.array_equal(bits(buf.data), bits(ref.data)), f"after {n} ranks: sharded != plain"
                mine.save(os.path.join(self.dir, f"ck{k}"))
                opt = mine
            self.barrier()
            # the ranks outside the group follow the plain run's params (they step nothing)
            buf.data[...] = ref.data
        last = os.path.join(self.dir, f"ck{len(counts) - 1}")
        # a plain optimizer loads the sharded checkpoint; a sharded one loads the plain one's file
        other = gpuadam.Adam(gpuadam.FlatBuffer.from_arrays(ref.views).views, **kw)
        other.load(last)
        a, b = plain.state_dict(), other.state_dict()
        for i in a["state"]:
            for name in a["state"][i]:
                assert np.array_equal(a["state"][i][name], b["state"][i][name]), (i, name)
        if self.rank == 0:
            plain.save(os.path.join(self.dir, "plain.npz"))
        self.barrier()
        back = ShardedOptimizer(gpuadam.Adam, buf, self.comm, **kw)
        back.load(os.path.join(self.dir, "plain.npz"))
        buf.data[...] = ref.data
        back.step(grads_of(buf, case, self.rank, t))
        plain.step(summed(buf, case, list(range(self.size)), t).views, grad_scale=float(self.size))
        assert np.array_equal(bits(buf.data), bits(ref.data)), "plain checkpoint -> sharded: differs"
        # refused, changing nothing: another layout, and an existing directory
        wrong = ShardedOptimizer(gpuadam.Adam, start([(4, 4)]), self.comm, **kw)
        before = wrong.optimizer.state_dict()
        for bad, err in ((last, ValueError), (os.path.join(self.dir, "missing"), OSError)):
            try:
                wrong.load(bad)
            except err:
                pass
            else:
                raise AssertionError(f"loading {bad} into another layout was not refused")
        after = wrong.optimizer.state_dict()
        names = [n for n in before["state"][0] if n != "step"]
        assert all(np.array_equal(before["state"][0][n], after["state"][0][n]) for n in names)
        try:
            back.save(last)
        except FileExistsError:
            pass
        else:
            raise AssertionError("saving over an existing checkpoint was not refused")
        assert opt is not None or self.rank >= max(counts)
        self.passed.append(f"checkpoints resharded {' -> '.join(map(str, counts))}, plain <-> sharded, refusals")

    # --- gpuadam.torch users: a flattened module's buffers, sharded over the process group ---------
    def torch_flattened(self) -> None:
        import torch

        from gpuadam.torch import flatten_parameters

        torch.manual_seed(3)  # the same model on every rank
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        (flat,) = flatten_parameters(model)
        params, grads = flat.flat_buffers()
        ref = gpuadam.FlatBuffer.from_arrays(params.views)
        plain = gpuadam.Adam(ref.views, lr=1e-2)
        opt = ShardedOptimizer(gpuadam.Adam, params, self.comm, lr=1e-2)
        for t in range(3):
            x = torch.from_numpy(np.random.default_rng([t, self.rank]).standard_normal((4, 6)).astype(np.float32))
            model.zero_grad(set_to_none=False)
            model(x).square().sum().backward()  # into the flattened gradient buffer
            total = gpuadam.FlatBuffer.from_arrays(grads.views)
            self.world.all_reduce(total.data)  # the sum opt.step reduce-scatters
            opt.step(grads)
            plain.step(total.views, grad_scale=float(self.size))
            assert np.array_equal(bits(params.data), bits(ref.data)), f"step {t}: sharded != plain"
        assert np.array_equal(model[0].weight.detach().numpy(), ref.views[0]), "the module does not see the step"
        self.same_on_every_rank(params.data)
        self.passed.append("gpuadam.torch flatten_parameters buffers, sharded")

    def run(self) -> None:
        two = self.size & (self.size - 1) == 0  # 1/N exact: the clip's sum of squares too
        self.stepping(1, gpuadam.Adam, {"lr": 1e-2})
        self.stepping(2, gpuadam.AdamW, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
                      step_kw={"max_grad_norm": 0.5} if two else {"grad_scale": 4.0})
        # 192 elements: an even cut at 2, 3 and 4 ranks (the collectives without a tail)
        self.stepping(3, gpuadam.Lion, {"lr": 1e-3}, average=False, step_kw={"grad_scale": 2.0}, shapes=[(12, 16)])
        self.stepping(4, gpuadam.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, shapes=[1])
        self.stepping(5, gpuadam.Adam, {"lr": 1e-2, "skip_nonfinite": True}, nan_at=1)
        if self.kind == "torch":  # MPI has no bfloat16 sum; gloo does
            from ml_dtypes import bfloat16

            # stochastic rounding hashes each element's index in the whole buffer: the same bits
            self.stepping(6, gpuadam.Adam, {"lr": 1e-2, "stochastic_rounding": True, "seed": 5}, dtype=bfloat16)
            self.torch_flattened()
        self.resharding()


def split(comm_kind: str, comm, rank: int, n: int):
    """A communicator of ranks 0..n-1 (None on the others); every rank calls it."""
    if comm_kind == "mpi":
        sub = comm.Split(0 if rank < n else 1, rank)
        return sub if rank < n else None
    import torch.distributed as dist

    group = dist.new_group(list(range(n)))
    return group if rank < n else None


def main() -> int:
    kind, directory = sys.argv[1], sys.argv[2]
    if kind == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        barrier = comm.Barrier
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        comm = dist
        barrier = dist.barrier
    world = communicator(comm)
    checks = Checks(comm, world, directory)
    checks.kind = kind
    checks.split = lambda n: split(kind, comm, world.rank, n)
    checks.barrier = barrier
    ok = 1.0
    try:
        checks.run()
    except Exception:
        traceback.print_exc()
        print(f"rank {world.rank}: FAILED after {len(checks.passed)} checks", flush=True)
        ok = 0.0
    total = world.sum_host(np.array([ok]))[0]
    if world.rank == 0 and total == world.size:
        with open(os.path.join(directory, "passed"), "w") as f:
            f.write("\n".join(checks.passed) + "\n")
    if kind != "mpi":
        # gloo's threads left running at interpreter exit can abort the process ("terminate called
        # without an active exception"): end the process groups first, together
        barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Train the demo's two-headed classifier data-parallel, with Adam's state sharded across ranks.

    mpiexec -n 4 python scripts/train_sharded.py           # mpi4py (pip install mpi4py mpich)
    torchrun --nproc-per-node 2 scripts/train_sharded.py   # torch.distributed, gloo
    python scripts/train_sharded.py                        # one process

Every rank holds the whole model in one FlatBuffer and computes the gradients of its own part of
each global batch (``--batch`` samples per rank); ``ShardedOptimizer`` averages them across ranks
(reduce-scatter), steps Adam on this rank's slice only, and all-gathers the updated params. Rank 0
prints the loss, the held-out accuracies, and each rank's optimizer state against an unsharded
optimizer's; at the end every rank checks that all ranks hold the same params, bit for bit.
Needs the ``demo`` extra (scikit-learn's digits).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import gpuadam
from gpuadam import demo
from gpuadam.distributed import ShardedOptimizer, communicator


def launched_comm(kind: str):
    """The communicator the launcher set up: MPI under mpiexec, torch.distributed under torchrun."""
    if kind == "auto":
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
            kind = "torch"
        elif any(v in os.environ for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
            kind = "mpi"
        else:
            kind = "single"
    if kind == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD
    if kind == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        return dist
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comm", choices=("auto", "mpi", "torch", "single"), default="auto")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args(argv)

    comm = communicator(launched_comm(args.comm))
    rank, size = comm.rank, comm.size
    config = demo.Config(steps=args.steps, batch_size=args.batch * size, hidden=args.hidden)
    train, test = demo.load_data(config)
    # the same global batches on every rank; each rank takes its own rows of them
    schedule = demo.batch_schedule(len(train.x), config)[:, rank::size]

    params = gpuadam.FlatBuffer.from_arrays(demo.init_params(config))
    grads = params.zeros_like()
    net = demo.TwoHeadedNet(np, params.views, grads.views)
    opt = ShardedOptimizer(gpuadam.Adam, params, comm, lr=args.lr)
    if rank == 0:
        whole = 2 * params.size * params.dtype.itemsize
        print(f"{size} rank(s), {params.size} params; Adam state per rank {opt.state_nbytes} B "
              f"(unsharded: {whole} B)", flush=True)
    start = time.perf_counter()
    for t, rows in enumerate(schedule):
        loss = net.loss_and_grad(train.x[rows], train.item[rows], train.domain[rows])
        opt.step(grads)
        if rank == 0 and (t % 100 == 0 or t == len(schedule) - 1):
            print(f"step {t:4d}  loss on rank 0's rows {float(loss):.3f}", flush=True)
    seconds = time.perf_counter() - start
    item, domain = net.predict(test.x)
    # every rank's params, bit for bit: the sum of each rank's bits equals size times one rank's
    bits = params.data.view(np.uint32).astype(np.float64)
    same = np.array_equal(comm.sum_host(bits), bits * size)
    agreed = comm.sum_host(np.array([float(same)]))[0] == size
    if rank == 0:
        print(f"held out: item accuracy {np.mean(item == test.item):.3f}, domain accuracy "
              f"{np.mean(domain == test.domain):.3f}; {seconds:.1f} s; params identical on all ranks: {agreed}")
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())

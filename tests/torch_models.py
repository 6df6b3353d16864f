"""The small torch model and batches the gpuadam.torch tests train (seeded: every call the same)."""

import torch


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(dtype)


def batches(dtype=torch.float64, steps=8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen, dtype=dtype), torch.randn(8, 3, generator=gen, dtype=dtype))
            for _ in range(steps)]

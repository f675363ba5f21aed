"""Routings that stress the kernels: one place, shared by every numerical test."""

import torch

# name -> (T, K, E); each case draws its ids in make_routing
CASES = {
    "single_token": (1, 3, 5),
    "uniform": (37, 4, 6),
    "all_on_one_expert": (40, 1, 4),  # one expert over several M-tiles
    "empty_experts": (9, 2, 16),
    "same_expert_twice": (7, 3, 4),
    "sentinel_ids": (13, 3, 5),
}


def make_routing(name: str, generator: torch.Generator, dtype=torch.float64, device="cpu"):
    """(top_k_index [T, K] int64, top_k_weights [T, K], E) for routing case ``name``."""
    T, K, E = CASES[name]
    if name == "all_on_one_expert":
        index = torch.full((T, K), 2, dtype=torch.int64)
    elif name == "empty_experts":
        index = torch.randint(0, 3, (T, K), generator=generator) * 5  # experts 0, 5, 10 only
    elif name == "same_expert_twice":
        index = torch.randint(0, E, (T, K), generator=generator)
        index[:, 1] = index[:, 0]
    elif name == "sentinel_ids":
        index = torch.randint(0, E + 1, (T, K), generator=generator)  # E is transformers' EP sentinel
        index[0, :] = E
    else:
        index = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=generator, dtype=torch.float64)
    return index.to(device), weights.to(device=device, dtype=dtype), E

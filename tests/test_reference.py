"""reference.py is the spec: it equals transformers' eager Qwen3MoeExperts in float64, forward and backward."""

import zlib

import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from qwen3_moe_patch.presets import make_config

from routings import CASES, make_routing

H, I = 24, 10


def _eager_experts(E, K, generator):
    experts = Qwen3MoeExperts(make_config(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                          num_experts_per_tok=K, experts_implementation="eager")).double()
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator, dtype=torch.float64) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator, dtype=torch.float64) * 0.3)
    return experts


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_equals_eager_in_float64(kernel, case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    index, weights, E = make_routing(case, gen)
    experts = _eager_experts(E, index.shape[1], gen)
    x = torch.randn(index.shape[0], H, generator=gen, dtype=torch.float64, requires_grad=True)
    weights.requires_grad_(True)

    # Sentinel ids (>= E) are dropped; eager sees the same routing as expert 0 with weight 0 (5.17's eager
    # cannot take sentinels).
    valid = index < E
    expected = experts(x, torch.where(valid, index, 0), torch.where(valid, weights, 0.0))
    out = kernel.reference.moe_experts(x, index, weights, experts.gate_up_proj, experts.down_proj)
    assert (out - expected).abs().max().item() <= 1e-12
    assert expected.abs().max().item() > 0.1  # the comparison is not between zeros

    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    params = (x, weights, experts.gate_up_proj, experts.down_proj)
    got = torch.autograd.grad(out, params, grad_out)
    want = torch.autograd.grad(expected, params, grad_out)
    for name, g, w in zip(("x", "top_k_weights", "gate_up_proj", "down_proj"), got, want):
        assert (g - w).abs().max().item() <= 1e-12, name


def test_routing_metadata(kernel):
    gen = torch.Generator().manual_seed(0)
    index, _, E = make_routing("sentinel_ids", gen)
    T, K = index.shape
    r = kernel.reference.route(index, E)
    flat = index.reshape(-1)
    valid = (flat >= 0) & (flat < E)
    assert r.counts.tolist() == [int((flat == e).sum()) for e in range(E)]
    assert r.offsets[0] == 0 and r.offsets[-1] == valid.sum() and torch.equal(r.offsets.diff(), r.counts)
    for e in range(E):  # each expert's rows hold its pairs in increasing pair id (stable)
        rows = r.order[r.offsets[e] : r.offsets[e + 1]]
        assert torch.equal(rows, torch.nonzero(flat == e).flatten())
    assert not valid[r.order[r.offsets[-1] :]].any()  # dropped pairs come last
    assert torch.equal(r.token, r.order // K)
    assert torch.equal(r.order[r.inverse.reshape(-1)], torch.arange(T * K))
    assert torch.equal(r.valid.reshape(-1), valid)


def test_experts_without_tokens_get_exact_zero_gradients(kernel):
    gen = torch.Generator().manual_seed(1)
    index, weights, E = make_routing("empty_experts", gen)
    w1 = torch.randn(E, 2 * I, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, H, I, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(index.shape[0], H, generator=gen, dtype=torch.float64)
    kernel.reference.moe_experts(x, index, weights, w1, w2).sum().backward()
    used = torch.zeros(E, dtype=torch.bool)
    used[index.unique()] = True
    assert (w1.grad[~used] == 0).all() and (w2.grad[~used] == 0).all()
    assert (w1.grad[used].abs().amax(dim=(1, 2)) > 0).all()


def _inputs(T=5, K=2, E=4):
    gen = torch.Generator().manual_seed(2)
    return dict(
        hidden=torch.randn(T, H, generator=gen),
        top_k_index=torch.randint(0, E, (T, K), generator=gen),
        top_k_weights=torch.rand(T, K, generator=gen),
        gate_up_proj=torch.randn(E, 2 * I, H, generator=gen),
        down_proj=torch.randn(E, H, I, generator=gen),
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=torch.randn(1, 5, H)), ValueError, r"hidden must be \[tokens, hidden_size\]"),
        (dict(gate_up_proj=torch.randn(4, 2 * I, H + 1)), ValueError, "inconsistent shapes"),
        (dict(down_proj=torch.randn(4, I, H)), ValueError, "inconsistent shapes"),
        (dict(top_k_weights=torch.rand(5, 3)), ValueError, r"both be \[T, K\]"),
        (dict(top_k_index=torch.zeros(5, 2)), TypeError, "integer"),
        (dict(top_k_index=torch.zeros(5, 2, dtype=torch.int64, device="meta")), ValueError, "one device"),
    ],
)
def test_functional_rejects_bad_input_clearly(kernel, change, error, match):
    with pytest.raises(error, match=match):
        kernel.moe_experts(**{**_inputs(), **change})
    with pytest.raises(ValueError, match="'gelu' is not supported"):
        kernel.moe_experts(**_inputs(), activation="gelu")

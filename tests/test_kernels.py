"""The Triton kernels against the float64 reference: forward, every gradient, determinism, saved activations.

On CPU they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA), in float64,
float32 and float16 (the interpreter's bfloat16 dot is broken); tests marked ``gpu`` run bfloat16 at
Qwen3-30B-A3B shapes on a CUDA device.
"""

import weakref
import zlib

import pytest
import torch

from routings import CASES, make_routing

H, I = 72, 40  # not multiples of any block; > one K-step and > one column block in the interpreter
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_rel(got, want, tol, name=""):
    """‖got − want‖ / ‖want‖ ≤ tol and every element within tol · max|want| (a wrong row fails both)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros"
    rel = ((got - want).norm() / want.norm()).item()
    worst = (got - want).abs().max().item() / scale
    assert rel <= tol and worst <= 10 * tol, f"{name}: relative error {rel:.3e}, worst element {worst:.3e} > {tol:.0e}"


def _problem(case, dtype, seed, device=DEVICE, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    index, weights, E = make_routing(case, gen)
    T, K = index.shape

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    tensors = [t.to(device=device, dtype=dtype) for t in
               (rand(T, H), weights, rand(E, 2 * I, H, scale=0.2), rand(E, H, I, scale=0.2))]
    if not contiguous:  # same values in transposed / strided storage
        def relayout(t, shape, view):
            return view(torch.empty(shape, dtype=t.dtype, device=t.device)).copy_(t)

        x, weights, w1, w2 = tensors
        tensors = [
            relayout(x, (H, T), lambda b: b.t()),
            relayout(weights, (T, 2 * K), lambda b: b[:, ::2]),
            relayout(w1, (E, H, 2 * I), lambda b: b.transpose(1, 2)),
            relayout(w2, (E, I, H), lambda b: b.transpose(1, 2)),
        ]
        index = relayout(index, (T, 2 * K), lambda b: b[:, 1::2])
        assert not any(t.is_contiguous() for t in (*tensors, index))
    leaves = [t.requires_grad_() for t in tensors]
    return leaves, index.to(device), torch.randn(T, H, generator=gen, dtype=torch.float64).to(device)


def _run(kernel, leaves, index, grad_out):
    x, weights, w1, w2 = leaves
    out = kernel.moe_experts(x, index, weights, w1, w2)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out.to(out.dtype))
    return out, grads


def _reference(kernel, leaves, index, grad_out):
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    x, weights, w1, w2 = ref_leaves
    out = kernel.reference.moe_experts(x, index, weights, w1, w2)
    return out, torch.autograd.grad(out, [t for t in ref_leaves if t.requires_grad], grad_out)


NAMES = ("out", "d hidden", "d top_k_weights", "d gate_up_proj", "d down_proj")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(kernel, case, dtype):
    leaves, index, grad_out = _problem(case, dtype, zlib.crc32(f"{case}{dtype}".encode()))
    out, grads = _run(kernel, leaves, index, grad_out)
    ref_out, ref_grads = _reference(kernel, leaves, index, grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[dtype], f"{case} {dtype} {name}")


def test_bfloat16_under_the_interpreter_takes_the_reference_path(kernel, caplog):
    """Triton 3.6's interpreter multiplies bfloat16 dot operands as raw integers (outputs ~1e9): such inputs must
    never reach the kernels there. Without the interpreter (CUDA) bfloat16 is the kernels' main dtype."""
    if not kernel.ops._INTERPRET:
        pytest.skip("not under TRITON_INTERPRET=1")
    import logging

    leaves, index, grad_out = _problem("uniform", torch.bfloat16, 31)
    kernel.functional._said_reference = False
    with caplog.at_level(logging.WARNING):
        out, grads = _run(kernel, leaves, index, grad_out)
    assert "bfloat16 weights under TRITON_INTERPRET=1 use the pure-torch reference path" in caplog.text
    ref_out, ref_grads = _reference(kernel, leaves, index, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[torch.bfloat16], name)


def test_non_contiguous_inputs(kernel):
    leaves, index, grad_out = _problem("uniform", torch.float32, 11, contiguous=False)
    out, grads = _run(kernel, leaves, index, grad_out.t().contiguous().t())
    ref_out, ref_grads = _reference(kernel, leaves, index, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[torch.float32], name)


def test_int32_indices_and_frozen_experts(kernel):
    """LoRA-style: expert weights frozen; no weight gradients are formed, the others still match."""
    leaves, index, grad_out = _problem("same_expert_twice", torch.float32, 12)
    leaves[2].requires_grad_(False)
    leaves[3].requires_grad_(False)
    out, grads = _run(kernel, leaves, index.int(), grad_out)
    ref_out, ref_grads = _reference(kernel, leaves, index, grad_out)
    assert len(grads) == 2
    for name, got, want in zip(NAMES[:3], (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[torch.float32], name)


@pytest.mark.parametrize("frozen", [0, 1], ids=["hidden", "top_k_weights"])
def test_hidden_or_routing_weights_without_gradient(kernel, frozen):
    """dX and the routing weights' gradient come from one gather-sum launch; each is also formed alone (a first
    layer's input needs no gradient), with the same values."""
    leaves, index, grad_out = _problem("sentinel_ids", torch.float64, 20)
    leaves[frozen].requires_grad_(False)
    out, grads = _run(kernel, leaves, index, grad_out)
    ref_out, ref_grads = _reference(kernel, leaves, index, grad_out)
    names = [name for name, t in zip(NAMES[1:], leaves) if t.requires_grad]
    assert len(grads) == len(names) == 3
    for name, got, want in zip(("out", *names), (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[torch.float64], name)


def test_launches_per_forward_and_backward(kernel, monkeypatch):
    """Each launch costs the host tens of microseconds (benchmarks/NOTES.md 21, 23), so the count is pinned: the
    routing in two, then gate_up, down and the weighted combine; dgrad, dX's rows, their gather-sum with the
    routing weights' gradient, and the two weight gradients."""
    launched = []
    path = kernel.launch._TritonPath
    triton_launch = path.launch

    def counted(self, grid, *args, **kwargs):
        launched.append(getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__)
        return triton_launch(self, grid, *args, **kwargs)

    monkeypatch.setattr(path, "launch", counted)
    leaves, index, grad_out = _problem("uniform", torch.float32, 21)
    with kernel.launch.jit_path():  # every launch through Triton's path, where it is counted
        _run(kernel, leaves, index, grad_out)
    assert launched == ["routing_count_kernel", "routing_place_kernel", "gate_up_swiglu_kernel", "grouped_gemm_kernel",
                        "combine_kernel", "down_dgrad_dswiglu_kernel", "grouped_gemm_kernel", "combine_kernel",
                        "expert_wgrad_kernel", "expert_wgrad_kernel"]


def test_experts_without_tokens_get_exact_zero_weight_gradients(kernel):
    leaves, index, grad_out = _problem("empty_experts", torch.float32, 13)
    _, (_, _, d_w1, d_w2) = _run(kernel, leaves, index, grad_out)
    used = torch.zeros(d_w1.shape[0], dtype=torch.bool)
    used[index.unique().cpu()] = True
    assert (d_w1[~used] == 0).all() and (d_w2[~used] == 0).all()
    assert (d_w1[used].abs().amax(dim=(1, 2)) > 0).all()


def test_two_runs_are_bit_identical(kernel):
    leaves, index, grad_out = _problem("uniform", torch.float32, 14)
    first = _run(kernel, leaves, index, grad_out)
    second = _run(kernel, leaves, index, grad_out)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_saves_only_hidden_z_weights_and_indices(kernel):
    leaves, index, _ = _problem("uniform", torch.float32, 15)
    x, weights, w1, w2 = leaves
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernel.moe_experts(x, index, weights, w1, w2)
    T, K = index.shape
    inputs = {t.data_ptr() for t in (x, weights, w1, w2)}
    floats = [t for t in saved if t.is_floating_point()]
    assert inputs <= {t.data_ptr() for t in floats}  # saved by reference, not copied
    activations = [tuple(t.shape) for t in floats if t.data_ptr() not in inputs and t.numel()]
    assert activations == [(T * K, 2 * I)]  # z only (LoRA's xa, ha are empty without LoRA); no T·K×H tensor
    indices = [t for t in saved if not t.is_floating_point()]
    assert all(t.dtype == torch.int32 and t.numel() <= T * K + 64 for t in indices)


def _check_routing(r, ref, num_pairs, height, what):
    """Device routing ``r`` against the reference ``ref``: rows, their inverse, and a tile table of ``height``
    that covers every row exactly once, used tiles first."""
    n = int(ref.offsets[-1])
    assert torch.equal(r.offsets.cpu().long(), ref.offsets), what
    assert torch.equal(r.row_pair[:n].cpu().long(), ref.order[:n]), what
    assert sorted(r.row_pair[n:].tolist()) == sorted(set(range(num_pairs)) - set(ref.order[:n].tolist())), what
    want = torch.where(ref.valid.reshape(-1), ref.inverse.reshape(-1), -1)
    assert torch.equal(r.pair_row.cpu().long(), want), what
    covered = torch.zeros(num_pairs, dtype=torch.int64)  # every row in exactly one tile of its expert
    for e, row in zip(r.tile_expert.tolist(), r.tile_row.tolist()):
        if e == -1:
            assert row == 0, what
            continue
        start, end = (int(ref.offsets[e]), int(ref.offsets[e + 1])) if e >= 0 else (n, num_pairs)
        lo, hi = row, min(row + height, end)
        assert lo >= start and hi > lo, (what, e, row)
        covered[lo:hi] += 1
    assert (covered == 1).all(), what
    assert (r.tile_expert >= 0).sum().item() == sum(-(-c // height) for c in ref.counts.tolist()), what
    assert (r.tile_expert == -2).sum().item() == -(-(num_pairs - n) // height), what
    used = (r.tile_expert != -1).nonzero().flatten()  # used tiles first, in row order
    assert torch.equal(used, torch.arange(used.numel())) and (r.tile_row[used].diff() > 0).all(), what


def test_device_routing_matches_reference_routing(kernel):
    route = kernel.ops.route
    for case in sorted(CASES):
        index, _, E = make_routing(case, torch.Generator().manual_seed(16))
        ref = kernel.reference.route(index, E)
        for height in (1, 4, 16, 64):
            _check_routing(route(index.to(DEVICE), E, block_m=height), ref, index.numel(), height, (case, height))


def test_device_routing_over_many_chunks(kernel):
    """More pairs than one chunk's program takes (chunks of 64 pairs, up to 256 chunks, then longer chunks): the
    cross-chunk prefix sums, the within-chunk ranks and the tile table's shares (several tiles per program) all
    count, on random and on skewed ids."""
    gen = torch.Generator().manual_seed(17)
    E = 12
    for T, K in ((300, 3), (4100, 5)):  # 900 pairs: 15 chunks; 20500 pairs: 81-pair chunks rounded to 128
        uniform = torch.randint(-1, E + 2, (T, K), generator=gen)  # with ids outside [0, E): dropped
        skewed = torch.where(torch.rand(T, K, generator=gen) < 0.7, 3, uniform)
        for index in (uniform, skewed):
            ref = kernel.reference.route(index, E)
            for height in (16, 64):
                r = kernel.ops.route(index.to(DEVICE), E, block_m=height)
                _check_routing(r, ref, T * K, height, (T, K, height))


def _op_args(kernel, leaves, index, block_m, lora=(None, None, None, None)):
    routing = kernel.ops.route(index, leaves[2].shape[0], block_m)
    return (*leaves, *routing, block_m, *lora, 0.5, 2.0, [], [], [64, 256, 64, 256])  # no 4-bit weights


@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_opcheck(kernel, with_lora):
    leaves, index, grad_out = _problem("sentinel_ids", torch.float32, 17)
    factors = _lora_factors(leaves[2], leaves[3], (4, 3), 17) if with_lora else (None,) * 4
    ops = kernel.ops
    args = _op_args(kernel, leaves, index, ops.block_m_for(index.numel(), leaves[2].shape[0]), factors)
    torch.library.opcheck(ops.experts_forward, args)
    _, z, xa, ha = ops.experts_forward(*args)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    bwd_args = (grad_out.float(), *plain[:4], z.detach(), xa.detach(), ha.detach(), *plain[4:], [True] * 8)
    if not with_lora:
        bwd_args = bwd_args[:-1] + ([True] * 4 + [False] * 4,)
    torch.library.opcheck(ops.experts_backward, bwd_args)


def test_backward_frees_row_buffers_before_the_weight_gradients(kernel, monkeypatch):
    """The [TK, H] dx rows and hs [TK, I] die before gate_up's weight gradient (the largest) is allocated: a
    layer's backward high-water mark is where a training step peaks."""
    leaves, index, grad_out = _problem("uniform", torch.float32, 19)
    factors = _lora_factors(leaves[2], leaves[3], (4, 3), 19)
    ops = kernel.ops
    args = _op_args(kernel, leaves, index, ops.block_m_for(index.numel(), leaves[2].shape[0]), factors)
    _, z, xa, ha = ops.experts_forward(*args)
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    buffers, checked = {}, []
    combine, wgrad = ops._combine, ops._expert_wgrad

    def spy_combine(rows, *rest):
        buffers["dx_rows"] = weakref.ref(rows)
        return combine(rows, *rest)

    def spy_wgrad(a, b, routing, like, *rest, **options):
        if like.shape == leaves[3].shape:  # down's gradient reads hs
            buffers["hs"] = weakref.ref(a)
        if like.shape == leaves[2].shape:
            checked.append({name: ref() is None for name, ref in buffers.items()})
        return wgrad(a, b, routing, like, *rest, **options)

    monkeypatch.setattr(ops, "_combine", spy_combine)
    monkeypatch.setattr(ops, "_expert_wgrad", spy_wgrad)
    ops.experts_backward(grad_out.float(), *plain[:4], z, xa, ha, *plain[4:], [True] * 8)
    assert checked == [{"dx_rows": True, "hs": True}]


def test_torch_compile_fullgraph_matches_eager(kernel):
    leaves, index, grad_out = _problem("uniform", torch.float32, 18)

    def step(x, weights, w1, w2):
        return kernel.moe_experts(x, index, weights, w1, w2)

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if torch.cuda.is_available() else "aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    ref_out, ref_grads = _run(kernel, leaves, index, grad_out)
    assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


# --- GPU: bfloat16 at Qwen3-30B-A3B shapes ---------------------------------------------------------------------


def _qwen3_30b_problem(T, seed, requires_grad=True):
    H30, I30, E, K = 2048, 768, 128, 8
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(T, E, generator=gen, device="cuda")
    weights, index = torch.softmax(logits, -1).topk(K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    x = torch.randn(T, H30, generator=gen, device="cuda")
    w1 = torch.randn(E, 2 * I30, H30, generator=gen, device="cuda") * 0.02
    w2 = torch.randn(E, H30, I30, generator=gen, device="cuda") * 0.02
    leaves = [t.bfloat16().requires_grad_(requires_grad) for t in (x, weights, w1, w2)]
    return leaves, index, torch.randn(T, H30, generator=gen, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 4096, 16384])
def test_gpu_bfloat16_qwen3_30b_shapes_match_float32_reference(kernel, T):
    leaves, index, grad_out = _qwen3_30b_problem(T, T)
    out, grads = _run(kernel, leaves, index, grad_out)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_out = kernel.reference.moe_experts(ref_leaves[0], index, ref_leaves[1], ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[torch.bfloat16], f"T={T} {name}")


@pytest.mark.gpu
def test_gpu_bit_identical_and_saved_bytes_per_token(kernel):
    T = 4096
    leaves, index, grad_out = _qwen3_30b_problem(T, 1)
    first, second = _run(kernel, leaves, index, grad_out), _run(kernel, leaves, index, grad_out)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    params = {t.data_ptr() for t in leaves[2:]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3])
    per_token = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in params) / T
    # x (2·H) + z (2·K·2I) + weights (2·K) + int32 indices (≈ 4·2K) bytes per token: 28.7 KiB at these shapes
    assert per_token <= 2 * 2048 + 2 * 8 * 2 * 768 + 2 * 8 + 4 * 2 * 8 + 64


def test_no_tokens(kernel):
    """T = 0 (e.g. an empty micro-batch): an empty output, and backward runs; no input gets a non-zero gradient."""
    leaves, index, _ = _problem("uniform", torch.float32, 19)
    x, weights, w1, w2 = leaves
    out = kernel.moe_experts(x[:0], index[:0], weights[:0], w1, w2)
    assert out.shape == (0, H) and out.dtype == x.dtype
    out.sum().backward()
    assert all(t.grad is None or not t.grad.any() for t in leaves)


# --- LoRA on the experts (split: x·Aᵀ then ·Bᵀ; W + s·B·A is never formed) ---------------------------------------


def _lora_factors(w1, w2, ranks, seed):
    """gate_up_a [E, r1, H], gate_up_b [E, 2I, r1], down_a [E, r2, I], down_b [E, H, r2] (B non-zero, so it matters)."""
    gen = torch.Generator().manual_seed(seed)
    E, two_i, hidden = w1.shape
    (r1, r2), inter = ranks, w2.shape[2]
    shapes = [(E, r1, hidden), (E, two_i, r1), (E, r2, inter), (E, hidden, r2)] if r2 else \
        [(E, r1, hidden), (E, two_i, r1)]
    factors = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3).to(w1.device, w1.dtype).requires_grad_()
               for shape in shapes]
    return tuple(factors) + (None, None) * (len(factors) == 2)


def _run_lora(kernel, leaves, index, grad_out, factors, module):
    x, weights, w1, w2 = leaves
    lora = kernel.ExpertsLora(*factors, gate_up_scale=0.5, down_scale=2.0)
    fn = kernel.moe_experts if module is kernel else kernel.reference.moe_experts
    out = fn(x, index, weights, w1, w2, lora=lora)
    inputs = [t for t in (*leaves, *factors) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


def _double(tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["uniform", "empty_experts", "sentinel_ids", "single_token"])
def test_lora_forward_and_gradients_match_reference(kernel, case, dtype):
    leaves, index, grad_out = _problem(case, dtype, zlib.crc32(f"lora{case}{dtype}".encode()))
    factors = _lora_factors(leaves[2], leaves[3], (4, 3), 20)
    out, grads = _run_lora(kernel, leaves, index, grad_out, factors, kernel)
    ref_out, ref_grads = _run_lora(kernel, _double(leaves), index, grad_out, _double(factors), kernel.reference)
    names = NAMES + ("d gate_up_a", "d gate_up_b", "d down_a", "d down_b")
    assert len(grads) == 8
    for name, got, want in zip(names, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[dtype], f"{case} {dtype} {name}")


@pytest.mark.parametrize("ranks", [(1, 20), (16, 0)], ids=["rank1_rank20", "gate_up_only"])
def test_lora_on_frozen_experts(kernel, ranks):
    """The fine-tuning case: base weights frozen (no dW), gradients for x, the routing weights and the factors."""
    leaves, index, grad_out = _problem("uniform", torch.float32, 21)
    for w in leaves[2:]:
        w.requires_grad_(False)
    factors = _lora_factors(leaves[2], leaves[3], ranks, 21)
    out, grads = _run_lora(kernel, leaves, index, grad_out, factors, kernel)
    ref_out, ref_grads = _run_lora(kernel, _double(leaves), index, grad_out, _double(factors), kernel.reference)
    assert len(grads) == 2 + sum(f is not None for f in factors)
    for i, (got, want) in enumerate(zip((out, *grads), (ref_out, *ref_grads))):
        assert_close_rel(got, want, TOL[torch.float32], f"output/gradient {i}")


def test_lora_saves_no_weight_sized_tensor(kernel):
    leaves, index, _ = _problem("uniform", torch.float32, 22)
    factors = _lora_factors(leaves[2], leaves[3], (4, 3), 22)
    inputs = {t.data_ptr() for t in (*leaves, *factors)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3], lora=kernel.ExpertsLora(*factors))
    T, K = index.shape
    activations = sorted(tuple(t.shape) for t in saved if t.is_floating_point() and t.data_ptr() not in inputs)
    assert activations == sorted([(T * K, 2 * I), (T * K, 4), (T * K, 3)])  # z, xa, ha


def test_lora_rejects_mismatched_factors(kernel):
    leaves, index, _ = _problem("uniform", torch.float32, 23)
    a1, b1, a2, b2 = _lora_factors(leaves[2], leaves[3], (4, 3), 23)
    with pytest.raises(ValueError, match=r"lora.gate_up_a must be \[E, r, 72\]"):
        kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3],
                           lora=kernel.ExpertsLora(a1[:, :, :10], b1, a2, b2))
    with pytest.raises(ValueError, match="given together"):
        kernel.moe_experts(leaves[0], index, leaves[1], leaves[2], leaves[3], lora=kernel.ExpertsLora(a1, None))

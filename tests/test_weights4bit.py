"""Stacked experts in bitsandbytes' 4-bit storage: the reference dequantization is bitsandbytes' own, bit for bit,
and the dequantize kernel (Triton's interpreter on CPU) gives the same bits."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 40, 72), (2, 5, 7)]  # the second: numel neither a multiple of the block size nor even


def _quantized(bnb, shape, dtype, quant_type, nested, blocksize, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
    w[0, 0, :3] = 0.0  # an all-zero start of a block and exact zeros among the values
    packed, state = bnb.quantize_4bit(w.to(DEVICE), blocksize=blocksize, quant_type=quant_type,
                                      compress_statistics=nested)
    return packed, state


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=["40x72", "5x7"])
def test_dequantize_is_bitsandbytes_bit_for_bit(kernel, bnb, shape, dtype, quant_type, nested):
    for seed, blocksize in ((0, 64), (1, 128)):
        packed, state = _quantized(bnb, shape, dtype, quant_type, nested, blocksize, seed)
        weight = kernel.weights4bit.from_bnb(packed, state)
        want = bnb.dequantize_4bit(packed, state)
        assert weight.nested == nested and weight.shape == shape and weight.dtype == dtype
        ref = kernel.weights4bit.dequantize(weight)
        assert ref.dtype == dtype and ref.shape == shape and torch.equal(ref, want)
        got = kernel.dequantize_4bit(weight)  # the kernel (interpreter on CPU): the same bits
        assert got.dtype == dtype and torch.equal(got, want), (seed, blocksize)
        assert want.abs().max() > 0 and (want == 0).any()


def test_inconsistent_storage_is_refused(kernel, bnb):
    packed, state = _quantized(bnb, (2, 8, 64), torch.float32, "nf4", False, 64, 2)
    state.shape = torch.Size((2, 8, 128))  # a shape the bytes do not hold
    with pytest.raises(ValueError, match="inconsistent 4-bit storage"):
        kernel.weights4bit.from_bnb(packed, state)
    with pytest.raises(TypeError, match="uint8"):
        kernel.weights4bit.from_bnb(packed.view(torch.int8), state)
    with pytest.raises(TypeError, match="Weight4bit"):
        kernel.dequantize_4bit(packed)


H4, I4 = 128, 64  # the 4-bit rows hold whole 64-element blocks


def _experts_problem(dtype, seed, E=6, T=40, K=2):
    gen = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(E + 1, generator=gen)[:K] for _ in range(T)])  # id E: an EP sentinel
    weights = torch.softmax(torch.randn(T, K, generator=gen, dtype=torch.float64), -1)
    x = torch.randn(T, H4, generator=gen, dtype=torch.float64)
    dense = [torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.2 for shape in ((E, 2 * I4, H4), (E, H4, I4))]
    grad_out = torch.randn(T, H4, generator=gen, dtype=torch.float64)
    return x, index, weights, dense, grad_out


@pytest.mark.parametrize("dtype, nested, tiles", [
    (torch.float32, False, "in-block"), (torch.float32, True, "in-block"), (torch.float16, False, "in-block"),
    (torch.float16, True, "in-block"), (torch.float16, True, "across-blocks"), (torch.float32, False, "across-blocks"),
])
def test_experts_on_4bit_weights_match_the_reference_on_their_dequantized_weights(kernel, bnb, dtype, nested, tiles):
    """Forward and the gradients of x, the routing weights and LoRA factors on frozen 4-bit experts (QLoRA):
    the kernels dequantize every weight tile as they load it, and no op allocates anything of a weight's size.
    "in-block": the interpreter's 32-wide tiles lie inside one 64-element block (one scale per tile row or column);
    "across-blocks": 128-wide tiles span two blocks (one scale per element), as some GPU configs do."""
    import contextlib

    from test_kernels import TOL, _lora_factors, assert_close_rel
    from test_lora import Allocations

    wide = kernel.tuning._config(128, 128 * dtype.itemsize // 2, 4, 1)  # BLOCK_K 128 for this dtype
    forced = kernel.tuning.forced(gate_up_4bit=wide, grouped_gemm_4bit=wide, dgrad=wide) if tiles == "across-blocks" \
        else contextlib.nullcontext()

    x, index, weights, dense, grad_out = _experts_problem(dtype, 30 + nested)
    quantized = []
    for w, quant_type in zip(dense, ("nf4", "fp4")):
        packed, state = bnb.quantize_4bit(w.to(dtype).to(DEVICE), blocksize=64, quant_type=quant_type,
                                          compress_statistics=nested)
        quantized.append(kernel.weights4bit.from_bnb(packed, state))
    exact = [kernel.weights4bit.dequantize(q) for q in quantized]  # what the 4-bit weights hold, in dtype
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, weights)]
    factors = _lora_factors(exact[0], exact[1], (4, 3), 31)
    lora = kernel.ExpertsLora(*factors, gate_up_scale=0.5, down_scale=2.0)
    with Allocations() as allocations, forced:
        out = kernel.moe_experts(leaves[0], index.to(DEVICE), leaves[1], *quantized, lora=lora)
        grads = torch.autograd.grad(out, [*leaves, *factors], grad_out.to(DEVICE, dtype))
    assert allocations.largest < exact[1].numel()  # nothing the size of a weight: no dense copy
    ref_leaves = [t.detach().double().requires_grad_() for t in (*leaves, *factors)]
    ref_lora = kernel.ExpertsLora(*ref_leaves[2:], gate_up_scale=0.5, down_scale=2.0)
    ref_out = kernel.reference.moe_experts(ref_leaves[0], index.to(DEVICE), ref_leaves[1], *(w.double() for w in exact),
                                           lora=ref_lora)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad_out.to(DEVICE))
    names = ("out", "d hidden", "d top_k_weights", "d gate_up_a", "d gate_up_b", "d down_a", "d down_b")
    for name, got, want in zip(names, (out, *grads), (ref_out, *ref_grads)):
        assert_close_rel(got, want, TOL[dtype], f"4-bit {dtype} {name}")


def test_torch_compile_runs_4bit_experts_eagerly_between_its_graphs(kernel, bnb, caplog, monkeypatch):
    """torch.compile cannot see into a Tensor4bit (it reads its Python attributes as opaque values): moe_experts
    on 4-bit weights under compile runs eagerly in a graph break, says so once, and gives eager's bits."""
    import logging

    from test_kernels import _lora_factors

    x, index, weights, dense, grad_out = _experts_problem(torch.float32, 33)
    frozen = []
    for w in dense:
        packed, state = bnb.quantize_4bit(w.float().to(DEVICE), blocksize=64, quant_type="nf4",
                                          compress_statistics=True)
        frozen.append(torch.nn.Parameter(kernel.Tensor4bit(kernel.weights4bit.from_bnb(packed, state)),
                                         requires_grad=False))
    exact = [kernel.weights4bit.dequantize(w.weight4bit) for w in frozen]
    factors = _lora_factors(exact[0], exact[1], (4, 3), 34)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (x, weights, *factors)]

    def step(x, w, a1, b1, a2, b2):
        lora = kernel.ExpertsLora(a1, b1, a2, b2, gate_up_scale=0.5, down_scale=2.0)
        return torch.tanh(kernel.moe_experts(x * 2, index.to(DEVICE), w, *frozen, lora=lora))

    want = step(*leaves)
    want_grads = torch.autograd.grad(want, leaves, grad_out.float().to(DEVICE))
    compiled = torch.compile(step, backend="aot_eager")  # the graphs' own ops as eager computes them
    monkeypatch.setattr(kernel.functional, "_said_4bit_compile", False)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            got = compiled(*leaves)
            grads = torch.autograd.grad(got, leaves, grad_out.float().to(DEVICE))
    assert caplog.text.count("does not trace 4-bit experts") == 1
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_4bit_rows_must_hold_whole_blocks(kernel, bnb):
    packed, state = _quantized(bnb, (2, 8, 96), torch.float32, "nf4", False, 64, 3)  # 96 = 1.5 blocks per row
    w4 = kernel.weights4bit.from_bnb(packed, state)
    with pytest.raises(ValueError, match="multiple of the block size"):
        kernel.weights4bit.stacked(w4)
    small_blocks = kernel.weights4bit.Weight4bit(  # the kernels' aligned row loads need blocks of 32 or more
        packed=torch.zeros(256, dtype=torch.uint8), absmax=torch.ones(32), code=torch.linspace(-1, 1, 16),
        shape=(2, 8, 32), dtype=torch.float32, blocksize=16)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.weights4bit.stacked(small_blocks)


def test_opcheck_with_4bit_weights(kernel, bnb):
    """The custom op (what torch.compile and export see) with 4-bit weights: fake tensors, schema, autograd."""
    x, index, weights, dense, _ = _experts_problem(torch.float32, 40)
    ops = kernel.ops
    operands, q, blocks = [], [], []
    for w, nested in zip(dense, (True, False)):
        packed, state = bnb.quantize_4bit(w.float().to(DEVICE), blocksize=64, quant_type="nf4",
                                          compress_statistics=nested)
        w4 = kernel.weights4bit.from_bnb(packed, state)
        operands.append(kernel.weights4bit.stacked(w4)[0])
        q.append(ops.q_list(w4))
        blocks += [w4.blocksize, w4.blocksize2]
    E = dense[0].shape[0]
    block_m = ops.block_m_for(index.numel(), E)
    x, weights = (t.float().to(DEVICE).requires_grad_() for t in (x, weights))
    args = (x, weights, *operands, *ops.route(index.to(DEVICE), E, block_m), block_m, None, None, None, None, 1.0, 1.0,
            *q, blocks)
    torch.library.opcheck(ops.experts_forward, args)


@pytest.mark.gpu
def test_experts_on_4bit_weights_in_bfloat16_on_the_gpu(kernel, bnb):
    """bf16 on the GPU at Qwen3-30B-A3B widths (8 experts): the compiled 4-bit loads against the float32
    reference on the dequantized weights, with LoRA."""
    from test_kernels import TOL, _lora_factors, assert_close_rel

    gen = torch.Generator().manual_seed(41)
    E, T, K, H, I = 8, 512, 4, 2048, 768
    index = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices.cuda()
    weights = torch.softmax(torch.randn(T, K, generator=gen), -1).cuda().bfloat16().requires_grad_()
    x = torch.randn(T, H, generator=gen).cuda().bfloat16().requires_grad_()
    quantized = []
    for shape, nested in (((E, 2 * I, H), True), ((E, H, I), False)):
        w = (torch.randn(*shape, generator=gen) * 0.02).cuda().bfloat16()
        quantized.append(kernel.weights4bit.from_bnb(*bnb.quantize_4bit(w, quant_type="nf4",
                                                                         compress_statistics=nested)))
    exact = [kernel.dequantize_4bit(q) for q in quantized]
    assert torch.equal(exact[0], bnb.dequantize_4bit(quantized[0].packed, _state_of(bnb, quantized[0], exact[0])))
    factors = _lora_factors(exact[0], exact[1], (16, 16), 42)
    lora = kernel.ExpertsLora(*factors, gate_up_scale=2.0, down_scale=2.0)
    grad_out = torch.randn(T, H, generator=gen).cuda().bfloat16()
    out = kernel.moe_experts(x, index, weights, *quantized, lora=lora)
    grads = torch.autograd.grad(out, [x, weights, *factors], grad_out)
    ref = [t.detach().float().requires_grad_() for t in (x, weights, *factors)]
    ref_out = kernel.reference.moe_experts(ref[0], index, ref[1], *(w.float() for w in exact),
                                           lora=kernel.ExpertsLora(*ref[2:], gate_up_scale=2.0, down_scale=2.0))
    ref_grads = torch.autograd.grad(ref_out, ref, grad_out.float())
    for j, (got, want) in enumerate(zip((out, *grads), (ref_out, *ref_grads))):
        assert_close_rel(got, want, TOL[torch.bfloat16], f"4-bit bf16 output/gradient {j}")


def _state_of(bnb, weight, like):
    """A bitsandbytes QuantState for ``weight`` (as quantize_4bit made it), to dequantize with bitsandbytes."""
    state2 = bnb.QuantState(absmax=weight.absmax2, code=weight.code2, blocksize=weight.blocksize2,
                            dtype=torch.float32) if weight.nested else None
    return bnb.QuantState(absmax=weight.absmax, shape=torch.Size(weight.shape), code=weight.code,
                          blocksize=weight.blocksize, quant_type="nf4", dtype=like.dtype, offset=weight.offset,
                          state2=state2)

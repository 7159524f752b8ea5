"""The CPU bag loops' copies and threads: the portable, AVX2 and AVX-512 copies (whichever this
CPU runs) give the same bits, the instruction-set switch, and several threads give the bits
of one."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from bags import MODES, grads_of, make_bags
from conftest import cpu_isas, each_cpu_isa, make_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES + ["sum+weights"])
def test_every_pooling_instruction_set_gives_the_same_bits(dtype, mode):
    """The portable, AVX2 and AVX-512 copies of the pooling loops (whichever this CPU runs)
    give bitwise the same outputs and arg-max rows, for every register-block shape, with
    NaN, infinities and padding."""
    isas = cpu_isas()
    assert isas[0] == "portable"
    if len(isas) == 1:
        pytest.skip("this CPU runs only the portable copy")
    m = mode.split("+")[0]
    as_bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    for dim, index_dtype in [(16, torch.int64), (32, torch.int32), (48, torch.int64),
                             (64, torch.int32), (80, torch.int64), (128, torch.int64),
                             (256, torch.int32), (272, torch.int64)]:
        weight = make_weight(40, dim, dtype) * 1e3  # fp16 / bf16 rounding of large sums
        weight[7, 1] = float("nan")
        weight[8, 2] = float("inf")
        if dtype == torch.float16:  # NaNs with payloads, one negative: kept alike by every copy
            weight.view(torch.int16)[9, 3] = 0x7E01
            weight.view(torch.int16)[10, 4] = -0x1FF  # 0xFE01
        ids, offsets = make_bags(40, padding_idx=3)
        ids, csr = ids.to(index_dtype), torch.cat([offsets, torch.tensor([55])]).to(index_dtype)
        psw = torch.randn(ids.shape, dtype=dtype) if mode == "sum+weights" else None
        outputs = each_cpu_isa(lambda: torch.ops.embedding_ext.embedding_bag_forward(
            weight, ids, csr, ee.ops.BAG_MODES[m], psw, 3))  # ids 55.. in no bag
        base_out, base_arg = outputs["portable"]
        for isa in isas[1:]:
            out, arg = outputs[isa]
            assert torch.equal(out.view(as_bits), base_out.view(as_bits)), (isa, dim)
            assert torch.equal(arg, base_arg), (isa, dim)


@pytest.mark.parametrize("dim", [5, 8, 64])
def test_sparse_gradient_rows_are_copied_alike_with_streaming_stores(dim):
    """The unscaled sparse gradient copies each bag's gradient row with AVX2 streaming stores
    where rows are 32-byte multiples: the same values and rows as the plain copy."""
    ids, offsets = make_bags(40, padding_idx=3)
    csr = torch.cat([offsets, torch.tensor([ids.numel()])])
    grad = torch.randn(csr.numel() - 1, dim)
    results = each_cpu_isa(lambda: torch.ops.embedding_ext.embedding_bag_sparse_backward(
        grad, ids, csr, 40, 0, None, 3, False))
    assert "portable" in results  # never an empty loop below
    keep = ids != 3
    bag_of = torch.repeat_interleave(torch.arange(csr.numel() - 1), csr.diff())
    for rows, values in results.values():
        assert torch.equal(rows[0], ids[keep])
        assert torch.equal(values, grad[bag_of[keep]])


def test_pooling_instruction_set_switch_refuses_bad_names():
    from embedding_ext import _C
    with pytest.raises(RuntimeError, match="'name' must be 'auto', 'portable', 'avx2' or 'avx512'"):
        _C._set_cpu_isa("sse9")
    assert _C._cpu_isa() in ("portable", "avx2", "avx512")


@pytest.mark.parametrize("mode", MODES)
def test_many_bags_on_several_threads(mode):
    """Enough bags for several parallel tasks (and, in max mode, tied rows): the same bits
    with 1 and 3 threads, and PyTorch's results."""
    weight = make_weight(500, 64, torch.float32)
    weight[7] = weight[3]  # ties between rows 3 and 7
    ids = torch.randint(0, 500, (40000,))
    ids[::5] = 3
    ids[1::5] = 7
    offsets = torch.arange(0, 40000, 8)
    grad_out = torch.randn(5000, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(grads_of(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out,
                                    mode=mode, padding_idx=0))
    finally:
        torch.set_num_threads(threads)
    (out1, (g1,)), (out3, (g3,)) = results
    assert torch.equal(out1, out3) and torch.equal(g1, g3)
    theirs, (gt,) = grads_of(F.embedding_bag, weight, ids, offsets, grad_out=grad_out, mode=mode,
                             padding_idx=0)
    torch.testing.assert_close(out1, theirs)
    torch.testing.assert_close(g1, gt, rtol=1e-4, atol=1e-4)

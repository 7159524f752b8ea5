"""Quantized tables: the codes (PyTorch's prepack bit for bit), the dequantization error, the
unpooled lookup, the modules, quantize_embeddings, errors, fakes, opcheck and compile."""
from __future__ import annotations

import pytest
import torch

import embedding_ext as ee
from embedding_ext import quantized_ops as qops
from quantized_cases import FORMATS, dequantize_reference, row_scales, tolerance

from conftest import DEVICES, INDEX_DTYPES, poison

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_prepack = {"int8": torch.ops.quantized.embedding_bag_byte_prepack,
            "int4": torch.ops.quantized.embedding_bag_4bit_prepack}


def _table(rows: int, dim: int, kind: str = "randn") -> torch.Tensor:
    w = torch.randn(rows, dim) * torch.rand(rows, 1) * 10
    if kind == "constant" and rows:
        w[: rows // 2] = 3.25  # constant rows: range 0
    if kind == "tiny":
        w = w * 1e-30
    return w


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("dim", [2, 8, 16, 30, 64, 128, 250])
@pytest.mark.parametrize("kind", ["randn", "constant", "tiny"])
def test_codes_equal_pytorch_prepack_bit_for_bit(format, dim, kind):
    w = _table(37, dim, kind)
    ours = qops.quantize_rows(w, format)
    assert torch.equal(ours, _prepack[format](w))


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_codes_of_low_precision_tables_equal_prepack_of_their_float32(format):
    w = _table(20, 32).half()
    assert torch.equal(qops.quantize_rows(w, format), _prepack[format](w.float()))


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_dequantized_row_within_half_a_step(format):
    w = _table(64, 96)
    packed = qops.quantize_rows(w, format)
    deq = dequantize_reference(packed, format)
    # Half a step (scale / 2); int4's bias is the fp16-rounded minimum, and values below it
    # clamp to code 0: add the bias's own rounding.
    bound = row_scales(packed, format) / 2
    if format == "int4":
        bound = bound + (w.double().min(1, keepdim=True).values
                         - w.double().min(1, keepdim=True).values.half().double()).abs()
    assert ((deq - w.double()).abs() <= bound * (1 + 1e-6) + 1e-7).all()


def test_fp8_error_bound():
    """e4m3 keeps 3 mantissa bits: a normal value is within 1/16 of itself; below e4m3's
    smallest normal (2^-6 of the scale) the step is 2^-9 scale, so half a step 2^-10 scale."""
    w = _table(64, 96)
    w[0, :5] = torch.tensor([1e-9, -1e-9, 0.0, 1e-3, 5.0])
    packed = qops.quantize_rows(w, "fp8")
    deq = dequantize_reference(packed, "fp8")
    scale = row_scales(packed, "fp8")
    assert torch.allclose(scale.squeeze(1), w.double().abs().amax(1) / 448, rtol=1e-6)
    bound = w.double().abs() / 16 + scale * 2.0 ** -10
    assert ((deq - w.double()).abs() <= bound * (1 + 1e-6)).all()


def test_every_fp8_code_reads_as_e4m3():
    codes = torch.arange(256, dtype=torch.uint8)
    packed = torch.cat([codes, torch.tensor([1.0]).view(torch.uint8)])[None]  # scale 1
    out = qops.quantized_embedding_forward(packed, "fp8", torch.tensor([0]), torch.float32)[0]
    torch.testing.assert_close(out, codes.view(torch.float8_e4m3fn).float(), equal_nan=True,
                               rtol=0, atol=0)


def test_quantize_refuses_odd_int4_dims_and_non_finite_rows():
    with pytest.raises(RuntimeError, match="even embedding_dim"):
        qops.quantize_rows(torch.randn(3, 5), "int4")
    w = torch.randn(4, 8)
    w[2, 3] = float("inf")
    with pytest.raises(RuntimeError, match="'weight' row 2 has a non-finite value"):
        qops.quantize_rows(w, "int8")
    with pytest.raises(RuntimeError, match="'format' must be"):
        qops.quantize_rows(torch.randn(3, 4), "int2")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (17,), (2, 3, 5), "noncontig"])
def test_lookup_equals_dequantized_rows(device, format, index_dtype, out_dtype, shape):
    dim = 2 * int(torch.randint(1, 80, ()))
    packed = qops.quantize_rows(_table(50, dim), format).to(device)
    ids = (torch.randint(0, 50, (6, 4)).t() if shape == "noncontig"
           else torch.randint(0, 50, shape)).to(device=device, dtype=index_dtype)
    poison(ids.numel() * dim, out_dtype, device)
    out = qops.quantized_embedding_forward(packed, format, ids, out_dtype)
    expected = dequantize_reference(packed, format)[ids.cpu().long()]
    assert out.shape == (*ids.shape, dim) and out.dtype == out_dtype and out.is_contiguous()
    assert not out.isnan().any()
    if out_dtype == torch.float32:
        torch.testing.assert_close(out.cpu().double(), expected, rtol=0,
                                   atol=tolerance(expected, 1))
    else:  # the fp32 lookup rounded once
        as_fp32 = qops.quantized_embedding_forward(packed, format, ids, torch.float32)
        assert torch.equal(out, as_fp32.to(out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ids_raise_index_error_and_name_the_position(device):
    packed = qops.quantize_rows(torch.randn(10, 8), "int8").to(device)
    ids = torch.tensor([1, 2, 10, 3], device=device)
    with pytest.raises(ee.EmbeddingIndexError, match="index 10 at position 2"):
        qops.quantized_embedding_forward(packed, "int8", ids, torch.float32)
        ee.check_cuda_index_errors()
    with pytest.raises(IndexError, match="index -1"):
        qops.quantized_embedding_forward(packed, "int8", torch.tensor([-1], device=device),
                                         torch.float32)
        ee.check_cuda_index_errors()


def test_op_arguments_are_checked_by_name():
    packed = qops.quantize_rows(torch.randn(10, 8), "int8")
    ids = torch.tensor([1])
    with pytest.raises(RuntimeError, match="'indices' must be an int64 or int32"):
        qops.quantized_embedding_forward(packed, "int8", ids.float(), torch.float32)
    with pytest.raises(RuntimeError, match="'packed' must be a uint8"):
        qops.quantized_embedding_forward(packed.float(), "int8", ids, torch.float32)
    with pytest.raises(RuntimeError, match="'dtype' must be float32"):
        qops.quantized_embedding_forward(packed, "int8", ids, torch.float64)
    with pytest.raises(RuntimeError, match="hold at least 8 bytes"):
        qops.quantized_embedding_forward(packed[:, :5], "int8", ids, torch.float32)


@pytest.mark.parametrize("bits,fp8", [(8, False), (4, False), (8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_module_from_float_keeps_options(bits, fp8, dtype):
    emb = torch.nn.Embedding(30, 16, padding_idx=-2, dtype=dtype)
    q = ee.QuantizedEmbedding.from_float(emb, bits=bits, fp8=fp8)
    assert (q.num_embeddings, q.embedding_dim, q.padding_idx) == (30, 16, 28)
    assert q.dtype == (torch.float32 if dtype == torch.float64 else dtype)
    ids = torch.randint(0, 30, (4, 5))
    out = q(ids)
    assert out.dtype == q.dtype and out.shape == (4, 5, 16)
    assert torch.equal(out.float(), q.dequantize()[ids].to(q.dtype).float())
    assert q.table_bytes() == 30 * qops.row_bytes(16, q.format)
    assert "format=" in repr(q)


@pytest.mark.parametrize("bits", [8, 4])
def test_from_prepacked_takes_pytorch_output_and_gives_it_back(bits):
    w = torch.randn(40, 24)
    packed = _prepack["int8" if bits == 8 else "int4"](w)
    q = ee.QuantizedEmbeddingBag.from_prepacked(packed, bits=bits, mode="sum")
    assert q.prepacked() is packed and q.embedding_dim == 24
    fresh = ee.QuantizedEmbeddingBag.from_float(torch.nn.EmbeddingBag.from_pretrained(w),
                                                bits=bits)
    assert torch.equal(fresh.prepacked(), packed)


def test_module_max_norm_is_applied_before_quantizing():
    emb = ee.Embedding(20, 8, max_norm=1.0)
    with torch.no_grad():
        emb.weight.mul_(5)
    q = ee.QuantizedEmbedding.from_float(emb)
    ids = torch.arange(20)
    expected = emb(ids).detach()  # renorms every row
    assert ((q(ids) - expected).abs() <= row_scales(q.packed, "int8").float() / 2 + 1e-6).all()


def test_quantize_embeddings_swaps_every_kind_and_keeps_ties():
    shared = torch.nn.Embedding(12, 8)
    model = torch.nn.ModuleDict({
        "a": shared, "b": ee.Embedding(10, 6, padding_idx=1),
        "bag": torch.nn.EmbeddingBag(9, 4, mode="max", include_last_offset=True),
        "ebag": ee.EmbeddingBag(9, 4, mode="sum", padding_idx=0),
        "inner": torch.nn.Sequential(shared, torch.nn.Linear(8, 2))})
    assert ee.quantize_embeddings(model, bits=4) is model
    assert type(model["a"]) is ee.QuantizedEmbedding and model["inner"][0] is model["a"]
    assert model["b"].padding_idx == 1 and model["b"].format == "int4"
    assert type(model["bag"]) is ee.QuantizedEmbeddingBag
    assert (model["bag"].mode, model["bag"].include_last_offset) == ("max", True)
    assert (model["ebag"].mode, model["ebag"].padding_idx) == ("sum", 0)
    assert model.state_dict()["a.packed"].dtype == torch.uint8
    single = ee.quantize_embeddings(torch.nn.Embedding(5, 4), fp8=True)
    assert type(single) is ee.QuantizedEmbedding and single.format == "fp8"
    with pytest.raises(ValueError, match="'bits' must be 8 or 4"):
        ee.quantize_embeddings(model, bits=2)


def test_a_lookup_that_needs_a_gradient_is_refused():
    q = ee.QuantizedEmbeddingBag.from_float(torch.nn.EmbeddingBag(10, 4, mode="sum"))
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    psw = torch.rand(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only.*requires grad"):
        q(ids, offsets, per_sample_weights=psw)
    with torch.no_grad():
        out = q(ids, offsets, per_sample_weights=psw)
    assert out.shape == (2, 4) and not out.requires_grad
    assert not q(ids, offsets).requires_grad  # no weight gradient is ever asked for


def _op_cases():
    packed = qops.quantize_rows(torch.randn(20, 16), "int4")
    ids = torch.randint(0, 20, (9,))
    offsets = torch.tensor([0, 3, 3, 9])
    return [
        (torch.ops.embedding_ext.quantize_rows.default, (torch.randn(6, 8), "int8")),
        (torch.ops.embedding_ext.quantized_embedding_forward.default,
         (packed, "int4", ids.reshape(3, 3), torch.float16)),
        (torch.ops.embedding_ext.quantized_embedding_bag_forward.default,
         (packed, "int4", ids, offsets, 0, torch.rand(9), 2, torch.float32)),
        (torch.ops.embedding_ext.quantized_embedding_bag_forward.default,
         (packed, "int4", ids.int(), offsets, 2, None, -1, torch.bfloat16)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_static"))


@pytest.mark.parametrize("bits,fp8", [(8, False), (4, False), (8, True)])
def test_compile_fullgraph(bits, fp8):
    torch._dynamo.reset()
    emb = ee.QuantizedEmbedding.from_float(torch.nn.Embedding(30, 8), bits=bits, fp8=fp8)
    bag = ee.QuantizedEmbeddingBag.from_float(torch.nn.EmbeddingBag(30, 8, mode="mean"),
                                              bits=bits, fp8=fp8)

    def model(ids, offsets):
        return emb(ids).sum(1) + bag(ids.reshape(-1), offsets)[: ids.shape[0]]

    ids, offsets = torch.randint(0, 30, (4, 3)), torch.tensor([0, 3, 6, 9, 12])
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(ids, offsets), model(ids, offsets))
    dynamic = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (4, 7):
        ids, offsets = torch.randint(0, 30, (rows, 3)), torch.arange(0, 3 * rows + 1, 3)
        torch.testing.assert_close(dynamic(ids, offsets), model(ids, offsets))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("bits,fp8", [(8, False), (4, False), (8, True)])
def test_modules_move_to_cuda_and_match_the_cpu(bits, fp8):
    bag = ee.QuantizedEmbeddingBag.from_float(torch.nn.EmbeddingBag(40, 32, mode="max"),
                                              bits=bits, fp8=fp8)
    emb = ee.QuantizedEmbedding.from_float(torch.nn.Embedding(40, 32).cuda(), bits=bits, fp8=fp8)
    assert emb.packed.is_cuda
    ids, offsets = torch.randint(0, 40, (30,)), torch.tensor([0, 4, 4, 17])
    expected = bag(ids, offsets)
    bag.cuda()
    torch.testing.assert_close(bag(ids.cuda(), offsets.cuda()).cpu(), expected)
    torch.testing.assert_close(emb(ids.cuda()).cpu(), emb.cpu()(ids))

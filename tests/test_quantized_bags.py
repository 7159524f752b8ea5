"""The pooled lookup of quantized tables: equal to "dequantize the rows, then the float bag"
(float64 reference) for every mode, format, output dtype, id dtype and instruction-set copy;
PyTorch's quantized ops where they agree (sum); the module's input forms; errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import embedding_ext as ee
from embedding_ext import quantized_ops as qops
from quantized_cases import FORMATS, bag_reference, dequantize_reference, tolerance

from conftest import DEVICES, INDEX_DTYPES, each_cpu_isa, poison

MODES = {"sum": 0, "mean": 1, "max": 2}


def _bags(rows: int, lengths: list[int], padding_idx: int, index_dtype=torch.int64):
    ids = torch.randint(0, rows, (sum(lengths),))
    ids[torch.rand(ids.shape) < 0.2] = max(padding_idx, 0)  # padding, and duplicates
    csr = torch.tensor([0] + lengths).cumsum(0)
    return ids.to(index_dtype), csr.to(index_dtype)


def _check(packed, format, ids, csr, mode, psw, padding_idx, out_dtype, device):
    bags = csr.numel() - 1
    poison(bags * (packed.shape[1] * 2), out_dtype, device)
    out = qops.quantized_embedding_bag_forward(
        packed.to(device), format, ids.to(device), csr.to(device), MODES[mode],
        None if psw is None else psw.to(device), padding_idx, out_dtype)
    table = dequantize_reference(packed, format)
    expected = bag_reference(table, ids, csr, mode, psw, padding_idx)
    assert out.shape == expected.shape and out.dtype == out_dtype
    assert not out.isnan().any()
    longest = int((csr[1:] - csr[:-1]).max()) if bags else 0
    weight_max = float(psw.abs().max()) if psw is not None and psw.numel() else 1.0
    atol = tolerance(table * weight_max, longest)
    if out_dtype == torch.float32:
        torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=atol)
    else:  # one rounding of the fp32 result
        torch.testing.assert_close(out.cpu().double(), expected,
                                   rtol=2 ** -8 if out_dtype == torch.float16 else 2 ** -7,
                                   atol=atol + 1e-6)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bag_equals_float_bag_of_dequantized_rows(device, format, mode, index_dtype, out_dtype):
    dim = 2 * int(torch.randint(1, 90, ()))
    packed = qops.quantize_rows(torch.randn(40, dim) * 3, format)
    ids, csr = _bags(40, [3, 0, 1, 7, 40, 2], 5, index_dtype)
    psw = torch.rand(ids.numel()) * 2 - 1 if mode == "sum" else None
    _check(packed, format, ids, csr, mode, psw, 5, out_dtype, device)


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [16, 32, 64, 96, 128, 130, 256])
def test_every_cpu_isa_copy_gives_the_same_bits(format, mode, dim):
    packed = qops.quantize_rows(torch.randn(60, dim), format)
    ids, csr = _bags(60, [5, 32, 0, 9], 3)
    psw = torch.rand(ids.numel()) if mode == "sum" else None
    results = each_cpu_isa(lambda: _check(packed, format, ids, csr, mode, psw, 3,
                                          torch.float32, "cpu"))
    first = next(iter(results.values()))
    for out in results.values():
        assert torch.equal(out, first)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_sum_matches_pytorch_quantized_ops(bits, index_dtype, weighted):
    w = torch.randn(100, 64)
    pt_op = (torch.ops.quantized.embedding_bag_byte_rowwise_offsets if bits == 8
             else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)
    packed = qops.quantize_rows(w, "int8" if bits == 8 else "int4")
    ids = torch.randint(0, 100, (300,), dtype=index_dtype)
    offsets = torch.tensor([0, 10, 10, 45, 299], dtype=index_dtype)
    psw = torch.rand(300) if weighted else None
    q = ee.QuantizedEmbeddingBag.from_prepacked(packed, bits=bits, mode="sum")
    theirs = pt_op(packed, ids, offsets, mode=0, per_sample_weights=psw)
    torch.testing.assert_close(q(ids, offsets, per_sample_weights=psw), theirs,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_module_input_forms_match_float_bag_on_dequantized_table(mode):
    float_bag = torch.nn.EmbeddingBag(30, 12, mode=mode, include_last_offset=True, padding_idx=4)
    q = ee.QuantizedEmbeddingBag.from_float(float_bag, bits=8)
    ref_bag = torch.nn.EmbeddingBag.from_pretrained(q.dequantize(), mode=mode,
                                                    include_last_offset=True, padding_idx=4)
    ids = torch.randint(0, 30, (20,))
    ids[::5] = 4
    for offsets in (torch.tensor([0, 3, 3, 11, 15]), torch.tensor([0, 6, 20])):
        torch.testing.assert_close(q(ids, offsets), ref_bag(ids, offsets), rtol=1e-6, atol=1e-6)
    assert q(ids, torch.tensor([0])).shape == (0, 12)  # (PyTorch's own bag crashes on this)
    two_d = ids.reshape(4, 5)
    plain = ee.QuantizedEmbeddingBag.from_float(torch.nn.EmbeddingBag(30, 12, mode=mode), bits=8)
    ref_plain = torch.nn.EmbeddingBag.from_pretrained(plain.dequantize(), mode=mode)
    torch.testing.assert_close(plain(two_d), ref_plain(two_d), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ids_and_offsets_raise(device):
    packed = qops.quantize_rows(torch.randn(10, 8), "int8").to(device)
    run = lambda ids, csr: (qops.quantized_embedding_bag_forward(  # noqa: E731
        packed, "int8", torch.tensor(ids, device=device), torch.tensor(csr, device=device), 0,
        None, -1, torch.float32), ee.check_cuda_index_errors())
    with pytest.raises(ee.EmbeddingIndexError, match="index 12 at position 3"):
        run([1, 2, 3, 12], [0, 2, 4])
    with pytest.raises(ee.EmbeddingIndexError, match="index 11 at position 4"):
        run([1, 2, 3, 4, 11], [0, 2, 4])  # after the last bag: still checked
    with pytest.raises((RuntimeError, IndexError), match="offsets"):
        run([1, 2, 3], [0, 2, 1])
    with pytest.raises((RuntimeError, IndexError), match="offsets"):
        run([1, 2, 3], [1, 3])


def test_bag_arguments_are_checked_by_name():
    packed = qops.quantize_rows(torch.randn(10, 8), "int8")
    ids, csr = torch.tensor([1, 2]), torch.tensor([0, 2])
    op = qops.quantized_embedding_bag_forward
    with pytest.raises(RuntimeError, match="'mode' must be"):
        op(packed, "int8", ids, csr, 3, None, -1, torch.float32)
    with pytest.raises(RuntimeError, match="only supported in sum mode"):
        op(packed, "int8", ids, csr, 1, torch.rand(2), -1, torch.float32)
    with pytest.raises(RuntimeError, match="'per_sample_weights' must be float32"):
        op(packed, "int8", ids, csr, 0, torch.rand(2).double(), -1, torch.float32)
    with pytest.raises(RuntimeError, match="'per_sample_weights' must have the shape"):
        op(packed, "int8", ids, csr, 0, torch.rand(3), -1, torch.float32)


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 300), format=st.sampled_from(sorted(FORMATS)),
       mode=st.sampled_from(sorted(MODES)), lengths=st.lists(st.integers(0, 12), max_size=8),
       rows=st.integers(1, 30), padding=st.booleans(), weighted=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_hypothesis_bags(dim, format, mode, lengths, rows, padding, weighted, seed):
    generator = torch.Generator().manual_seed(seed)
    if format == "int4":
        dim += dim % 2
    packed = qops.quantize_rows(torch.randn(rows, dim, generator=generator), format)
    n = sum(lengths)
    ids = torch.randint(0, rows, (n,), generator=generator)
    padding_idx = int(torch.randint(0, rows, (), generator=generator)) if padding else -1
    if padding and n:
        ids[: lengths[0]] = padding_idx  # an all-padding (or empty) first bag
    csr = torch.tensor([0] + lengths).cumsum(0)
    psw = torch.randn(n, generator=generator) if weighted and mode == "sum" else None
    _check(packed, format, ids, csr, mode, psw, padding_idx, torch.float32, "cpu")

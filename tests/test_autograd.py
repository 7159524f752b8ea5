"""gradcheck, gradgradcheck, forward-mode AD, opcheck."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd import forward_ad

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, make_indices, make_weight

OPTIONS = [dict(), dict(padding_idx=2), dict(scale_grad_by_freq=True),
           dict(padding_idx=-2, scale_grad_by_freq=True)]
IDS = ["plain", "padding", "freq", "padding-freq"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_gradcheck_and_gradgradcheck(device, options):
    """Padding positions get no gradient although the forward returns the stored row, so the
    function checked zeroes them; with scale_grad_by_freq the "gradient" is by definition not
    the Jacobian (as in PyTorch), so the checked function is the gradient map
    grad_output -> grad_weight, which is linear: gradcheck then tests our double backward
    and gradgradcheck the third order against it."""
    num_weights = 7
    weight = make_weight(num_weights, 3, torch.float64, device).requires_grad_()
    pad = options.get("padding_idx")
    idx = make_indices((4, 3), num_weights, device, padding_idx=pad)
    keep = (idx != pad % num_weights)[..., None] if pad is not None else torch.ones(1, device=device)
    if not options.get("scale_grad_by_freq"):
        fn, inputs = (lambda w: ee.embedding(idx, w, **options) * keep), (weight,)
    else:
        grad_out = torch.randn(4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
        fn = lambda g: torch.autograd.grad(  # noqa: E731
            ee.embedding(idx, weight, **options), weight, g, create_graph=True)[0]
        inputs = (grad_out,)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_scaled_by_frequency(device):
    """d/d(grad_output) of the weight gradient is the scaled gather (PyTorch forgets the
    1/count here; SPEC: beyond PyTorch)."""
    weight = make_weight(5, 2, torch.float64, device).requires_grad_()
    idx = torch.tensor([1, 1, 1, 3, 0], device=device)
    out = ee.embedding(idx, weight, padding_idx=0, scale_grad_by_freq=True)
    grad_out = torch.randn_like(out, requires_grad=True)
    (grad_w,) = torch.autograd.grad(out, weight, grad_out, create_graph=True)
    v = torch.randn_like(grad_w)
    (grad_grad_out,) = torch.autograd.grad(grad_w, grad_out, v)
    scale = reference.position_scales(idx, 5, 0, True)
    torch.testing.assert_close(grad_grad_out, v[idx] * scale[:, None])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_ad(device):
    weight = make_weight(8, 4, torch.float64, device)
    tangent = torch.randn_like(weight)
    idx = make_indices((3, 5), 8, device)
    with forward_ad.dual_level():
        out = ee.embedding(idx, forward_ad.make_dual(weight, tangent), padding_idx=0)
        primal, out_tangent = forward_ad.unpack_dual(out)
    assert torch.equal(primal, weight[idx])
    assert torch.equal(out_tangent, tangent[idx])
    _, jvp_out = torch.func.jvp(lambda w: ee.embedding(idx, w), (weight,), (tangent,))
    assert torch.equal(jvp_out, tangent[idx])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_forward_mode(device):
    weight = make_weight(6, 3, torch.float64, device).requires_grad_()
    idx = make_indices((4,), 6, device)
    assert gradcheck(lambda w: ee.embedding(idx, w), (weight,),
                     check_forward_ad=True, check_backward_ad=True)


def _opcheck_cases(device):
    w = make_weight(9, 5, torch.float32, device)
    idx = make_indices((3, 4), 9, device)
    idx32 = idx.to(torch.int32)
    g = torch.randn(3, 4, 5, device=device)
    ops = torch.ops.embedding_ext
    wg = w.clone().requires_grad_()
    return [
        (ops.embedding.default, (wg, idx, -1, False, False)),
        (ops.embedding.default, (wg, idx32, 2, True, False)),
        (ops.embedding.default, (w, idx, -1, False, True)),
        (ops.embedding_dense_backward.default, (g.clone().requires_grad_(), idx, 9, 2, True)),
        (ops.embedding_scaled_gather.default, (wg, idx, -1, True)),
        (ops.embedding_forward.default, (w, idx)),
        (ops.embedding_forward.default, (w.to(torch.bfloat16), idx32)),
        (ops.embedding_dense_backward.default, (g, idx, 9, -1, False)),
        (ops.embedding_dense_backward.default, (g.half(), idx32, 9, 2, True)),
        (ops.embedding_scaled_gather.default, (w, idx, 2, True)),
        (ops.embedding_sparse_backward.default, (g, idx, 9, -1, True)),
        (ops.embedding_sparse_backward.default, (g, idx, 9, int(idx[0, 0]), False)),
        (ops.embedding_renorm_.default, (w.clone(), idx, 1.0, 2.0)),
    ] + _bag_opcheck_cases(device) + _fused_update_opcheck_cases(device)


def _fused_update_opcheck_cases(device):
    """The fused optimizer step, one case per rule (in place on the weight and its state)."""
    ops = torch.ops.embedding_ext
    w = make_weight(9, 5, torch.float32, device)
    idx = make_indices((3, 4), 9, device, padding_idx=2)
    g = torch.randn(3, 4, 5, device=device)
    state = lambda *shape: torch.rand(*shape, device=device)  # noqa: E731
    return [
        (ops.embedding_fused_update_.default,
         (w.clone(), g, idx, 2, False, 0, None, None, 0.1, 0.0, 0.0, 0.0, 0.0, 1)),
        (ops.embedding_fused_update_.default,
         (w.clone(), g, idx.int(), -1, True, 1, state(9, 5), None, 0.1, 1e-10, 0.0, 0.0, 0.01, 3)),
        (ops.embedding_fused_update_.default,
         (w.clone(), g, idx, 2, False, 2, state(9, 5), state(9, 5), 0.1, 1e-8, 0.9, 0.999, 0.0, 2)),
        (ops.embedding_fused_update_.default,
         (w.double(), g.double(), idx, 2, True, 3, state(9).double(), None, 0.1, 1e-8, 0.0, 0.0,
          0.0, 1)),
    ]


def _bag_opcheck_cases(device):
    """The pooled lookup's ops."""
    ops = torch.ops.embedding_ext
    w = make_weight(10, 4, torch.float64, device)
    ids = torch.tensor([1, 2, 2, 0, 5, 7], device=device)
    csr = torch.tensor([0, 3, 3, 6], device=device)
    psw = torch.randn(6, dtype=torch.float64, device=device)
    out, arg_max = ops.embedding_bag_forward(w, ids, csr, 2, None, -1)
    g = torch.randn_like(out)
    return [
        (ops.embedding_bag_forward.default, (w, ids, csr, 0, psw, 2)),
        (ops.embedding_bag_forward.default, (w.float(), ids.int(), csr.int(), 2, None, -1)),
        (ops.embedding_bag_dense_backward.default, (g, ids, csr, arg_max, 10, 2, None, -1, False)),
        (ops.embedding_bag_dense_backward.default,
         (g, ids, csr, torch.empty(0, 4, dtype=torch.long, device=device), 10, 1, None, 2, True)),
        (ops.embedding_bag_dense_backward.default,
         (g.bfloat16(), ids, csr, torch.empty(0, 4, dtype=torch.long, device=device), 10, 0, psw,
          -1, False)),
        (ops.embedding_bag_per_sample_weights_backward.default, (g, w, ids, csr, 2)),
        (ops.embedding_bag_sparse_backward.default, (g, ids, csr, 10, 0, psw, 2, True)),
        (ops.embedding_bag_sparse_backward.default, (g.float(), ids.int(), csr.int(), 10, 1, None, -1, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    cases = _opcheck_cases(device)
    covered = {op._schema.name for op, _ in cases}
    # The many-table collection's ops have their opcheck cases in test_collection.py, the
    # quantized tables' in test_quantized.py.
    elsewhere = ("embedding_ext::embedding_bag_collection_", "embedding_ext::quantize")
    registered = {name for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("embedding_ext::") and not name.startswith(elsewhere)}
    assert registered and registered <= covered, f"ops without an opcheck case: {registered - covered}"
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_public_function_and_torch_func_grad(device):
    """ee.EmbeddingFunction itself, and torch.func.grad (which needs the setup_context
    style), give the same gradient as the eager path."""
    weight = make_weight(9, 4, torch.float64, device).requires_grad_()
    idx = make_indices((6,), 9, device, padding_idx=2)
    out = ee.EmbeddingFunction.apply(weight, idx, 2, True, False)
    (direct,) = torch.autograd.grad(out.sum(), weight)
    (eager,) = torch.autograd.grad(ee.embedding(idx, weight, padding_idx=2,
                                                scale_grad_by_freq=True).sum(), weight)
    functional = torch.func.grad(
        lambda w: ee.embedding(idx, w, padding_idx=2, scale_grad_by_freq=True).sum())(weight.detach())
    assert torch.equal(direct, eager) and torch.equal(functional, eager)


@pytest.mark.parametrize("device", DEVICES)
def test_second_order_through_torch_func_and_forward_over_reverse(device):
    """The C++ nodes also serve nested transforms: grad of grad, and jvp of grad (forward
    mode through the gradient ops), against the same quantities computed by hand."""
    weight = make_weight(7, 3, torch.float64, device)
    idx = make_indices((10,), 7, device, padding_idx=1)
    grad_out = torch.randn(10, 3, dtype=torch.float64, device=device)
    scales = reference.position_scales(idx, 7, 1, True)[:, None]

    def gradient_map(g):  # linear: g -> d/dw <embedding(w), g>
        return torch.func.grad(lambda w: (ee.embedding(idx, w, padding_idx=1,
                                                       scale_grad_by_freq=True) * g).sum())(weight)

    tangent = torch.randn_like(grad_out)
    value, jvp_out = torch.func.jvp(gradient_map, (grad_out,), (tangent,))
    expected = reference.dense_backward(grad_out, idx, 7, 1, True)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(jvp_out, reference.dense_backward(tangent, idx, 7, 1, True))
    v = torch.randn_like(weight)
    # d/dg <gradient_map(g), v> = v[idx] * scale (0 at padding): the scaled gather.
    gg = torch.func.grad(lambda g: (gradient_map(g) * v).sum())(grad_out)
    torch.testing.assert_close(gg, v[idx] * scales)
    # The Python EmbeddingFunction gives the same double backward.
    w = weight.clone().requires_grad_()
    out = ee.EmbeddingFunction.apply(w, idx, 1, True, False)
    g = grad_out.clone().requires_grad_()
    (gw,) = torch.autograd.grad(out, w, g, create_graph=True)
    (gg_fn,) = torch.autograd.grad(gw, g, v)
    torch.testing.assert_close(gg_fn, gg)

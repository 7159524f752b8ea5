"""Runs every CUDA kernel once on small, duplicate-heavy inputs; meant to be run under
compute-sanitizer (memcheck, racecheck) by bench/gpu_suite.sh. Every result is checked
against the float64 reference (embedding_ext/reference.py): the renormed weight, the
forward rows, the dense and sparse gradients, the double-backward (scaled-gather)
output, the pooled lookup's ops and the fused optimizer step. Exits non-zero on a wrong result, so a clean sanitizer log also means the kernels
computed the right thing. `python -m bench.sanitize_kernels cpu` runs the same checks on CPU; `--quick` runs
fewer dtype pairs."""
import sys

import torch

import embedding_ext as ee
from embedding_ext import reference


# Tolerances against the float64 reference, as in tests/conftest.py.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def check(what, actual, expected, dtype, exact=False):
    """Raises (exit non-zero) with the case in the message when a result is wrong."""
    if exact:
        if not torch.equal(actual, expected):
            raise AssertionError(f"{what}: not bitwise equal")
        return
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


# Every (dtype, id dtype) pair with rows of 3 (odd width, scalar path), 64 (a multiple of
# 16 bytes in every dtype: the vector paths) and 257 (odd, longer than a warp); --quick keeps
# four pairs, for the slower sanitizers.
FULL = [(d, i) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        for i in (torch.int32, torch.int64)]
QUICK = [(torch.float32, torch.int32), (torch.bfloat16, torch.int64),
         (torch.float16, torch.int32), (torch.float64, torch.int64)]
DIMS = (3, 64, 257)


def check_bad_ids(dev):
    """A bad id, with and without max_norm: reported, and the weight left as it was."""
    bad = torch.tensor([0, 99], device=dev)
    for max_norm in (None, 1.0):  # the renorm path too: its probe must keep every row as is
        weight = torch.randn(10, 4, device=dev) * 5
        before = weight.clone()
        try:  # raised by the call itself (its renorm probe ran first) or by the check
            ee.embedding(bad, weight, max_norm=max_norm)
            ee.check_cuda_index_errors()
        except IndexError as err:
            print("bad index reported:", err, flush=True)
        else:
            raise SystemExit("the out-of-range index was not reported")
        if not torch.equal(weight, before):
            raise SystemExit("a bad id in a max_norm call changed the weight")
    torch.cuda.synchronize()


def check_bad_bags(dev):
    """The pooled lookup's error paths: a bad id, offsets out of order, offsets past the ids;
    each reported, nothing read outside the tensors (what the sanitizer checks)."""
    weight = torch.randn(10, 4, device=dev)
    ids = torch.tensor([1, 99, 3, 4], device=dev)
    for offsets in ([0, 2], [0, 3, 1], [0, 9]):
        try:
            ee.embedding_bag(ids if offsets == [0, 2] else ids.clamp_max(9), weight,
                             torch.tensor(offsets, device=dev), mode="max")
            ee.check_cuda_index_errors()
        except IndexError as err:
            print("bad bag input reported:", err, flush=True)
        else:
            raise SystemExit(f"the bad bag input (offsets {offsets}) was not reported")
    torch.cuda.synchronize()


def run_bag_case(dev, dtype, index_dtype, dim):
    """Every bag op and mode (padding, an empty bag, ids after the last offset, a hot row):
    forward and both
    weight gradients and the per_sample_weights gradient against the float64 reference."""
    case = f"bags {dtype}, {index_dtype}, dim={dim}"
    print("case", case, flush=True)
    idx = torch.randint(0, 50, (40,), device=dev, dtype=index_dtype)
    idx[::3] = 5
    idx[1::7] = 3
    # include_last_offset: ids 38 and 39, after the last offset, join the last bag (as in
    # PyTorch), so the reference's CSR ends at the last id.
    csr = torch.tensor([0, 4, 4, 17, 30, 38], device=dev, dtype=index_dtype)
    csr_all = torch.cat([csr[:-1], csr.new_full((1,), idx.numel())])
    for mode in ("sum", "mean", "max"):
        for sparse in ((False, True) if mode != "max" else (False,)):
            weight = torch.randn(50, dim, device=dev, dtype=dtype, requires_grad=True)
            psw = (torch.randn(40, device=dev, dtype=dtype, requires_grad=True)
                   if mode == "sum" else None)
            out = ee.embedding_bag(idx, weight, csr, mode=mode, padding_idx=3, sparse=sparse,
                                   per_sample_weights=psw, include_last_offset=True,
                                   scale_grad_by_freq=mode != "max")
            w64 = weight.detach().double().requires_grad_()
            p64 = None if psw is None else psw.detach().double().requires_grad_()
            expected = reference.bag_forward(w64, idx, csr_all, mode, p64, 3)
            check(f"{case} {mode} forward", out, expected, dtype)
            grad_out = torch.randn_like(out)
            out.backward(grad_out)
            (g64,) = torch.autograd.grad(expected, w64, grad_out.double(), retain_graph=True)
            if mode != "max":  # scale_grad_by_freq: each row over its count among the ids
                in_bags = idx.long()
                counts = torch.bincount(in_bags[in_bags != 3], minlength=50).clamp_min(1)
                g64 = g64 / counts[:, None]
            got = weight.grad.to_dense() if sparse else weight.grad
            torch.testing.assert_close(got.double(), g64, atol=2e-2, rtol=2e-2,
                                       msg=lambda m: f"{case} {mode} sparse={sparse} gradient: {m}")
            if psw is not None:
                (gp,) = torch.autograd.grad(expected, p64, grad_out.double())
                torch.testing.assert_close(psw.grad.double(), gp, atol=2e-2, rtol=2e-2,
                                           msg=lambda m: f"{case} per_sample_weights gradient: {m}")


def check_hot_rows(dev):
    """Segments many times longer than the sorted backward's chunks (both of its kernels)."""
    for dtype in (torch.float32, torch.bfloat16):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            idx = torch.randint(0, 40, (1500,), device=dev)
            idx[::3] = 5
            idx[1::7] = 3
            weight = torch.randn(40, 24, device=dev, dtype=dtype, requires_grad=True)
            out = ee.embedding(idx, weight, padding_idx=3, scale_grad_by_freq=True)
            grad_out = torch.randn_like(out)
            out.backward(grad_out)
            torch.testing.assert_close(
                weight.grad.double(), reference.dense_backward(grad_out, idx, 40, 3, True),
                atol=2e-2, rtol=2e-2, msg=lambda m: f"hot rows ({dtype}, {deterministic}): {m}")
            torch.use_deterministic_algorithms(False)
    print("hot rows: ok", flush=True)


def run_case(dev, dtype, index_dtype, dim):
    case = f"{dtype}, {index_dtype}, dim={dim}"
    print("case", case, flush=True)
    weight = torch.randn(50, dim, device=dev, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, 50, (7, 9), device=dev, dtype=index_dtype)
    idx[0, :4] = 3  # duplicates of the padding row
    idx[1, :3] = 5  # duplicates of an ordinary row
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        for sparse in (False, True):
            what = f"{case}, deterministic={deterministic}, sparse={sparse}"
            weight.grad = None
            before = weight.detach().clone()
            out = ee.embedding(idx, weight, padding_idx=3, max_norm=2.0,
                               scale_grad_by_freq=True, sparse=sparse)
            # The renorm kernel (in place), then the gather of the renormed rows.
            check(f"renorm ({what})", weight.detach(),
                  reference.renorm(before, idx, 2.0, 2.0), dtype)
            check(f"forward ({what})", out, weight.detach()[idx.long()], dtype,
                  exact=True)
            grad_out = torch.randn_like(out)
            out.backward(grad_out)
            expected = reference.dense_backward(grad_out, idx, 50, 3, True)
            got = weight.grad.to_dense() if sparse else weight.grad
            torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2,
                                       msg=lambda m: f"backward ({what}): {m}")
        torch.use_deterministic_algorithms(False)
    # Double backward: the scaled-gather kernel. d(sum(gw))/d(go) at a position
    # is 1/count of its row, 0 at padding; for a general v it gathers v's rows
    # with the same scale.
    go = torch.randn(7, 9, dim, device=dev, dtype=dtype, requires_grad=True)
    (gw,) = torch.autograd.grad(
        ee.embedding(idx, weight, padding_idx=3, scale_grad_by_freq=True),
        weight, go, create_graph=True)
    check(f"dense backward, create_graph ({case})", gw,
          reference.dense_backward(go.detach(), idx, 50, 3, True), dtype)
    scales = reference.position_scales(idx, 50, 3, True).reshape(7, 9, 1)
    (ggo,) = torch.autograd.grad(gw.sum(), go, retain_graph=True)
    if ggo.shape != go.shape or ggo.dtype != dtype:
        raise AssertionError(f"scaled gather ({case}): {ggo.dtype} {tuple(ggo.shape)}")
    check(f"scaled gather of ones ({case})", ggo,
          scales.expand(7, 9, dim), dtype)
    if not ggo[0, :4].eq(0).all():
        raise AssertionError(f"scaled gather ({case}): padding positions not 0")
    v = torch.randn(50, dim, device=dev, dtype=dtype)
    (ggo,) = torch.autograd.grad(gw, go, v)
    check(f"scaled gather ({case})", ggo, reference.forward(v, idx) * scales, dtype)


def run_fused_case(dev, dtype, index_dtype, dim):
    """The fused optimizer step (embedding_fused_update_), every rule, a hot row, padding and
    scale_grad_by_freq: three steps on `dev` against the same steps in float64 on the CPU."""
    case = f"fused update {dtype}, {index_dtype}, dim={dim}"
    print("case", case, flush=True)
    rules = [(torch.optim.SGD, dict(lr=0.1)), (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01)),
             (torch.optim.SparseAdam, dict(lr=0.05)), (ee.optim.RowWiseAdagrad, dict(lr=0.1))]
    for cls, kwargs in rules:
        ours = ee.Embedding(50, dim, padding_idx=3, scale_grad_by_freq=True, dtype=dtype,
                            device=dev)
        ref = ee.Embedding(50, dim, padding_idx=3, scale_grad_by_freq=True, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(ours.weight.double().cpu())
        opt, ref_opt = ee.fuse_optimizer(ours, cls, **kwargs), ee.fuse_optimizer(ref, cls, **kwargs)
        for _ in range(3):
            idx = torch.randint(0, 50, (40,), dtype=index_dtype)
            idx[::3] = 5
            idx[1::7] = 3
            grad_out = torch.randn(40, dim, dtype=dtype)
            ours(idx.to(dev)).backward(grad_out.to(dev))
            ref(idx).backward(grad_out.double())
            opt.step()
            ref_opt.step()
        tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ours.weight.detach().double().cpu(), ref.weight.detach(), **tol,
                                   msg=lambda m: f"{case} {cls.__name__}: {m}")


def run_collection_case(dev, dtype, index_dtype, dim):
    """The many-table collection (sum, mean and max tables, a shared table, padding, an empty
    bag and feature): forward, dense and sparse gradients against the CPU kernels; on CUDA
    also a bad id and a bad offset, reported and nothing read outside."""
    print(f"case collection {dtype}, {index_dtype}, dim={dim}", flush=True)
    configs = [ee.EmbeddingBagConfig(30, dim, ["a", "b"], name="t0", pooling="sum",
                                     padding_idx=2),
               ee.EmbeddingBagConfig(7, 3, ["c"], name="t1", pooling="mean"),
               ee.EmbeddingBagConfig(12, dim + 1, ["d"], name="t2", pooling="max")]
    lengths = torch.tensor([2, 0, 3, 1, 4, 2, 0, 5, 1, 1, 3, 0])  # 4 features x B=3
    values = torch.cat([torch.randint(0, r, (int(n),)) for r, n in
                        zip([30] * 6 + [7] * 3 + [12] * 3, lengths)]).to(index_dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(index_dtype)
    for sparse in (False, True):
        cpu = ee.EmbeddingBagCollection(configs[:2] if sparse else configs, dtype=dtype,
                                        sparse=sparse)
        v, o = (values, offsets) if not sparse else (values[:int(offsets[9])], offsets[:10])
        here = ee.EmbeddingBagCollection(configs[:2] if sparse else configs, dtype=dtype,
                                         sparse=sparse).to(dev)
        here.load_state_dict(cpu.state_dict())
        full = here if not sparse else full  # the dense one has every table
        out, ref = here(v.to(dev), o.to(dev)), cpu(v, o)
        check("collection forward", out.cpu(), ref, dtype)
        grad = torch.randn(ref.shape, dtype=dtype)
        out.backward(grad.to(dev))
        ref.backward(grad)
        for (name, p), q in zip(here.named_parameters(), cpu.parameters()):
            check(f"collection {name} grad", p.grad.cpu().to_dense(), q.grad.to_dense(), dtype)
    # 300 features: two launches of up to 256 on CUDA.
    wide = [ee.EmbeddingBagConfig(20, dim, [f"w{i}" for i in range(300)], name="w")]
    wide_cpu = ee.EmbeddingBagCollection(wide, dtype=dtype)
    wide_here = ee.EmbeddingBagCollection(wide, dtype=dtype).to(dev)
    wide_here.load_state_dict(wide_cpu.state_dict())
    ids = torch.randint(0, 20, (600,)).to(index_dtype)
    offs = torch.arange(0, 601, 2).to(index_dtype)  # B=1, two ids per feature
    check("collection 300 features", wide_here(ids.to(dev), offs.to(dev)).detach().cpu(),
          wide_cpu(ids, offs).detach(), dtype)
    if dev == "cuda":
        for bad in ("id", "offset"):
            v, o = values.clone(), offsets.clone()
            if bad == "id":
                v[-1] = 99
            else:
                o[5] = int(o[-1]) + 3
            with torch.no_grad():
                full(v.to(dev), o.to(dev))
            try:
                ee.check_cuda_index_errors()
            except IndexError as err:
                print("collection bad", bad, "reported:", err, flush=True)
            else:
                raise SystemExit(f"the collection's bad {bad} was not reported")


def main():
    torch.manual_seed(0)
    args = sys.argv[1:]
    quick = "--quick" in args
    dev = next((a for a in args if not a.startswith("--")), "cuda")
    if dev == "cuda":  # first: the error paths, the riskiest host code
        check_bad_ids(dev)
        check_bad_bags(dev)
    check_hot_rows(dev)
    for dtype, index_dtype in QUICK if quick else FULL:
        for dim in DIMS:
            run_case(dev, dtype, index_dtype, dim)
            run_bag_case(dev, dtype, index_dtype, dim)
            run_fused_case(dev, dtype, index_dtype, dim)
            run_collection_case(dev, dtype, index_dtype, dim)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("sanitize_kernels: all kernels ran and matched the reference on", dev)


if __name__ == "__main__":
    main()

"""Runs every CUDA kernel once on small, duplicate-heavy inputs; meant to be run under
compute-sanitizer (memcheck, racecheck) by bench/gpu_suite.sh. Exits non-zero on a wrong
result, so a clean sanitizer log also means the kernels computed the right thing."""
import sys

import torch

import embedding_ext as ee
from embedding_ext import reference


def main():
    torch.manual_seed(0)
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for index_dtype in (torch.int32, torch.int64):
            for dim in (3, 257):  # odd widths: scalar and vector paths, short and long rows
                weight = torch.randn(50, dim, device=dev, dtype=dtype, requires_grad=True)
                idx = torch.randint(0, 50, (7, 9), device=dev, dtype=index_dtype)
                idx[0, :4] = 3  # duplicates
                for deterministic in (False, True):
                    torch.use_deterministic_algorithms(deterministic)
                    for sparse in (False, True):
                        weight.grad = None
                        out = ee.embedding(idx, weight, padding_idx=3, max_norm=2.0,
                                           scale_grad_by_freq=True, sparse=sparse)
                        grad_out = torch.randn_like(out)
                        out.backward(grad_out)
                        expected = reference.dense_backward(grad_out, idx, 50, 3, True)
                        got = weight.grad.to_dense() if sparse else weight.grad
                        torch.testing.assert_close(got.double(), expected,
                                                   atol=2e-2, rtol=2e-2)
                    torch.use_deterministic_algorithms(False)
                # Double backward: the scaled-gather kernel.
                go = torch.randn(7, 9, dim, device=dev, dtype=dtype, requires_grad=True)
                (gw,) = torch.autograd.grad(ee.embedding(idx, weight, scale_grad_by_freq=True),
                                            weight, go, create_graph=True)
                torch.autograd.grad(gw.sum(), go)
    if dev != "cuda":
        print("sanitize_kernels: all kernels matched the reference on", dev)
        return
    bad = torch.tensor([0, 99], device=dev)
    ee.embedding(bad, torch.randn(10, 4, device=dev))
    try:
        ee.check_cuda_index_errors()
    except IndexError as err:
        print("bad index reported:", err)
    else:
        raise SystemExit("the out-of-range index was not reported")
    torch.cuda.synchronize()
    print("sanitize_kernels: all kernels ran and matched the reference")


if __name__ == "__main__":
    main()

"""Small facts the GPU check records before the tests (python -m bench.gpu_probe):
- the bad-index record round trip on its own (a kernel reports, the host raises), so that a
  crash there is seen in isolation (gpu_suite.sh reruns it under cuda-gdb for a backtrace);
- what PyTorch's own CUDA backward does with no ids and scale_grad_by_freq=True (our tests
  compare with PyTorch and must know whether PyTorch fails there)."""
import glob
import shutil
import subprocess

import torch
import torch.nn.functional as F

import embedding_ext as ee


def toolchain():
    """Which compilers built the binary (one gcc version expected), and a C++ exception
    thrown out of a _C binding (no CUDA involved)."""
    if shutil.which("readelf"):
        for so in glob.glob("embedding_ext/_C*.so"):
            comment = subprocess.run(["readelf", "-p", ".comment", so], capture_output=True,
                                     text=True).stdout
            print("compilers:", sorted({line.split("]", 1)[-1].strip()
                                        for line in comment.splitlines() if "]" in line}))
    try:
        ee._C._cpu_dense_backward(torch.randn(2, 4), torch.tensor([0, 1]), 10, -1, False, "fast")
    except RuntimeError as err:
        print("exception out of _C: ok:", str(err).splitlines()[0][:80], flush=True)


def bad_index_round_trip():
    weight = torch.randn(10, 16, device="cuda")
    # Raised through the dispatcher by the next call (the asynchronous path) first.
    ee.embedding(torch.tensor([1, 12], device="cuda"), weight)
    torch.cuda.synchronize()
    try:
        ee.embedding(torch.tensor([0], device="cuda"), weight)
    except IndexError as err:
        print("pending bad index raised by the next call:", err, flush=True)
    else:
        raise SystemExit("pending bad index NOT raised by the next call")
    out = ee.embedding(torch.tensor([1, 2, 12, 3], device="cuda"), weight)
    try:
        ee.check_cuda_index_errors()
    except IndexError as err:
        print("bad index raised:", err, flush=True)
    else:
        raise SystemExit("bad index NOT raised")
    assert not out[2].any()
    ee.check_cuda_index_errors()  # cleared


def pytorch_empty_freq_backward():
    for dtype in (torch.float32, torch.float16):
        w = torch.randn(13, 6, device="cuda", dtype=dtype, requires_grad=True)
        idx = torch.empty(0, dtype=torch.long, device="cuda")
        try:
            out = F.embedding(idx, w, scale_grad_by_freq=True)
            (g,) = torch.autograd.grad(out, w, torch.randn_like(out))
            torch.cuda.synchronize()
            print(f"PyTorch {torch.__version__} CUDA backward, no ids, freq, {dtype}: "
                  f"ok, all zero: {not g.any().item()}", flush=True)
        except RuntimeError as err:
            print(f"PyTorch {torch.__version__} CUDA backward, no ids, freq, {dtype}: "
                  f"RuntimeError: {str(err).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    print(ee.build_info(), torch.cuda.get_device_name(), flush=True)
    toolchain()
    pytorch_empty_freq_backward()
    bad_index_round_trip()
    print("gpu_probe: done", flush=True)

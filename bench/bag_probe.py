"""A quick look at the CPU pooled lookup against PyTorch (issue 13, before it joins the
benchmark presets): V=1e6, D=64 fp32, 65,536 ids in bags of 32, 1 thread, the shape the
issue quotes. `python -m bench.bag_probe`; figures in bench/NOTES-cpu.md section 7."""
import torch, torch.nn.functional as F, embedding_ext as ee
import torch.utils.benchmark as tb
torch.manual_seed(0)
torch.set_num_threads(1)
V, D, N, L = 1_000_000, 64, 65536, 32
w = torch.randn(V, D)
ids = torch.randint(0, V, (N,))
off = torch.arange(0, N, L)
def t(fn):
    return tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median*1e3
for mode, pad in (("sum", None), ("mean", None), ("mean", 0), ("max", None), ("sum", 0)):
    a = t(lambda: ee.embedding_bag(ids, w, off, mode=mode, padding_idx=pad))
    b = t(lambda: F.embedding_bag(ids, w, off, mode=mode, padding_idx=pad))
    print(f"fwd {mode} pad={pad}: ours {a:.2f} ms torch {b:.2f} ms  {b/a:.2f}x")
wg = w.clone().requires_grad_(); wt = w.clone().requires_grad_()
g = torch.randn(N//L, D)
def step(fn, ww, mode, pad):
    def run():
        ww.grad = None
        fn(ids, ww, off, mode=mode, padding_idx=pad).backward(g)
    return run
for mode, pad in (("sum", None), ("mean", 0)):
    a = t(step(ee.embedding_bag, wg, mode, pad)); b = t(step(F.embedding_bag, wt, mode, pad))
    print(f"fwd+bwd {mode} pad={pad}: ours {a:.2f} ms torch {b:.2f} ms  {b/a:.2f}x")

"""Inputs and a gradient helper shared by the ee.embedding_bag tests (test_bag_*.py)."""
import torch

MODES = ["sum", "mean", "max"]


def make_bags(num_weights, index_dtype=torch.int64, padding_idx=None):
    """1-D ids with hot rows and padding, and offsets with an empty bag, an all-padding bag
    (when padding is given) and a long one."""
    n = 60
    ids = torch.randint(0, num_weights, (n,))
    ids[::4] = 3  # a hot row
    if padding_idx is not None:
        ids[1::5] = padding_idx
        ids[10:13] = padding_idx  # bag 2 is all padding
    offsets = torch.tensor([0, 4, 4, 10, 13, 30, 31])  # bag 1 empty; last bag 31..60
    return ids.to(index_dtype), offsets.to(index_dtype)


def grads_of(fn, weight, *args, grad_out=None, psw=None, **kwargs):
    """fn(args[0], weight, *args[1:], per_sample_weights=psw, **kwargs) on fresh leaf copies
    of weight and psw: the output and the gradients (weight's, then psw's when given) for
    grad_out."""
    w = weight.detach().clone().requires_grad_()
    p = None if psw is None else psw.detach().clone().requires_grad_()
    out = fn(args[0], w, *args[1:], per_sample_weights=p, **kwargs)
    inputs = (w,) if p is None else (w, p)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads

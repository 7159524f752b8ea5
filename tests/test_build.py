"""The build reports what it compiled, CUDA is compiled wherever it can be, and no
aten::embedding* op runs underneath our API."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import embedding_ext as ee
from conftest import make_indices, RecordOps


def _nvcc_available():
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if shutil.which("nvcc"):
        homes.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    return any(h and (Path(h) / "bin" / "nvcc").exists() for h in homes)


def test_cuda_kernels_built_whenever_possible():
    info = ee.build_info()
    assert info["torch_version"] == torch.__version__
    expected = (torch.version.cuda is not None and _nvcc_available()
                and os.environ.get("EMBEDDING_EXT_FORCE_CPU", "0") != "1")
    assert ("cuda" in info["backends"]) == expected, (
        f"torch CUDA build: {torch.version.cuda}, nvcc found: {_nvcc_available()}, "
        f"but the extension reports backends {info['backends']}")
    # Every schema in csrc/embedding_ext.cpp has a kernel for every backend built.
    names = _registered_ops()
    assert len(names) >= 6, names
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in names:
        if name == "embedding_ext::embedding":
            # Its Autograd kernel goes down to embedding_forward's backend kernels; below
            # autograd it is that op (csrc/autograd.cpp).
            assert has(name, "Autograd") and has(name, "CompositeExplicitAutograd"), name
            continue
        assert has(name, "CPU"), name
        assert has(name, "CUDA") == expected, name
    if expected:
        assert info["cuda_arch_list"]


def _registered_ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("embedding_ext::"))


def _schema_file_ops() -> list[str]:
    source = (Path(__file__).parent.parent / "csrc" / "embedding_ext.cpp").read_text()
    return sorted("embedding_ext::" + m for m in re.findall(r'"(\w+)\(', source))


def test_schema_file_is_the_one_place_ops_are_declared():
    assert _registered_ops() == _schema_file_ops()


def test_differentiable_ops_have_cpp_autograd_kernels():
    """The lookup and its two gradient ops record C++ autograd nodes (csrc/autograd.cpp);
    the others have none (they are never differentiated)."""
    with_autograd = {n for n in _registered_ops()
                     if torch._C._dispatch_has_kernel_for_dispatch_key(n, "Autograd")}
    assert with_autograd == {"embedding_ext::embedding", "embedding_ext::embedding_dense_backward",
                             "embedding_ext::embedding_scaled_gather"}


def test_no_aten_embedding_op_runs():
    weight = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    idx = make_indices((3, 5), 20, padding_idx=0)
    with RecordOps() as rec:
        for sparse in (False, True):
            out = ee.embedding(idx, weight, padding_idx=0, max_norm=1.0,
                               scale_grad_by_freq=True, sparse=sparse)
            grad_out = torch.randn_like(out, requires_grad=not sparse)
            (g,) = torch.autograd.grad(out, weight, grad_out, create_graph=not sparse)
            if not sparse:
                torch.autograd.grad(g, grad_out, torch.randn_like(g))
        module = ee.Embedding(20, 4)
        module(idx).sum().backward()
    assert any(op.startswith("embedding_ext.") for op in rec.ops)
    assert [op for op in rec.ops if "embedding" in op and not op.startswith("embedding_ext.")] == []
    assert {"embedding_ext.embedding_forward.default", "embedding_ext.embedding_renorm_.default",
            "embedding_ext.embedding_dense_backward.default",
            "embedding_ext.embedding_scaled_gather.default",
            "embedding_ext.embedding_sparse_backward.default"} <= set(rec.ops)


def test_import_refuses_a_binary_built_for_another_torch(monkeypatch):
    import importlib

    monkeypatch.setattr(torch, "__version__", "0.0.0-not-this-one")
    try:
        with __import__("pytest").raises(ImportError, match="built against torch .* but torch 0.0.0-not-this-one is imported"):
            importlib.reload(ee)
    finally:
        monkeypatch.undo()
        importlib.reload(ee)
    assert ee.build_info()["torch_version"] == torch.__version__


def test_binary_uses_the_shared_cpp_runtime():
    """A private (static) copy of libstdc++ in our binary breaks every error message that
    formats a number: cut short here, a SIGSEGV on the H200 machine of 2026-11-26, whose
    toolchain linked libstdc++ statically. setup.py links torch's own libstdc++ and refuses
    such a binary; this checks the one that was built, and a message with numbers."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    defined = subprocess.run([nm, "--defined-only", ee._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    assert "_ZNSo9_M_insertIlEERSoT_" not in defined, "std::ostream::_M_insert<long> is ours"
    with pytest.raises(IndexError) as err:
        ee.embedding(torch.tensor([12]), torch.randn(10, 4))
    assert str(err.value).endswith("valid indices are 0 <= index < 10; index out of range in self")


def test_public_api_is_typed():
    """py.typed ships with the package, and every public function and the module's
    constructor annotate every parameter and the return value."""
    import inspect
    assert (Path(ee.__file__).parent / "py.typed").exists()
    functions = [getattr(ee, name) for name in ee.__all__
                 if inspect.isfunction(getattr(ee, name))]
    functions += [ee.Embedding.__init__, ee.Embedding.forward]
    assert len(functions) > 10
    for fn in functions:
        sig = inspect.signature(fn)
        missing = [p.name for p in sig.parameters.values()
                   if p.name != "self" and p.annotation is inspect.Parameter.empty]
        assert not missing, f"{fn.__qualname__}: parameters without a type: {missing}"
        assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__qualname__}: no return type"

// The C++ side of embedding_ext.EmbeddingIndexError (embedding_ext/errors.py): an exception
// that PyTorch's error translation turns into that Python class, a subclass of both
// IndexError and RuntimeError. Included by each binary's python_module.cpp only, which
// defines raise_index_error (checks.h) with it and takes the class at import.
#pragma once

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace embedding_ext {
namespace {

PyObject* g_index_error_class = nullptr;  // set once at import; kept alive for good

struct EmbeddingIndexError : torch::PyTorchError {
  using torch::PyTorchError::PyTorchError;
  PyObject* python_type() override {
    return g_index_error_class != nullptr ? g_index_error_class : PyExc_IndexError;
  }
};

void set_index_error_class(pybind11::object cls) { g_index_error_class = cls.release().ptr(); }

}  // namespace

[[noreturn]] void raise_index_error(const std::string& message) {
  throw EmbeddingIndexError(message);
}

}  // namespace embedding_ext

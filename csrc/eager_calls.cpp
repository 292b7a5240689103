// The Python module lmrt._C: its functions run a whole eager lmrt.ops call in one C call.
//
// lmrt.ops.layer_norm, rms_norm, softmax, log_softmax and scaled_dot_product_attention call these first (outside
// torch.compile). Each one reads the call's arguments, and when the call is one the extension serves (the backend
// choice names cpp or cuda, or there is none and the tensors are on the CPU, where cpp comes first) and the
// arguments would pass lmrt.ops' checks, it runs the differentiable operator of autograd.cpp through the dispatcher
// and returns its output. In every other case it returns None, and the Python path decides: another backend, a
// fallback with its warning, or an error that names the argument. So this file only has to recognise the common
// call, never to explain a bad one.
//
// Why it exists: after a kernel has streamed a few MB through the caches, the Python that runs before the next
// kernel finds none of its objects there, and the checks and backend choice of lmrt.ops took some 40 us per call
// on the 2-core Xeon of the CPU benchmarks, about a fifth of a LayerNorm of 1024 x 768 float32 elements; for the
// one-query attention of generation with a KV cache, the Python path took 46 us per call against 9 for the kernel.
#include <Python.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ExpandUtils.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "operators.h"

namespace {

using at::Tensor;
using lmrt::is_kernel_dtype;
using lmrt::typed_operator;

// Whether the backend choice `choice` picks the extension for a call on `device`: `choice` is the value of
// lmrt.backends.context_choice (a backend's name, or None when LMRT_BACKEND, then the default order, decides).
bool extension_chosen(PyObject* choice, c10::DeviceType device) {
  const char* name = nullptr;
  if (choice != Py_None) {
    name = PyUnicode_Check(choice) ? PyUnicode_AsUTF8(choice) : nullptr;
    if (name == nullptr) {
      PyErr_Clear();
      return false;
    }
  } else {
    name = std::getenv("LMRT_BACKEND");
  }
  if (name == nullptr || *name == '\0') {
    return device == c10::DeviceType::CPU;
  }
  if (std::strcmp(name, "cpp") == 0) {
    return device == c10::DeviceType::CPU;
  }
#ifdef LMRT_WITH_CUDA
  if (std::strcmp(name, "cuda") == 0) {
    return device == c10::DeviceType::CUDA;
  }
#endif
  return false;
}

// Whether the extension serves a call on `device` under the backend choice `choice`. Not under autocast: the Python
// path casts as autocast casts the torch.nn.functional op (lmrt/ops/_autocast.py). Autocast is asked only about the
// devices the extension serves, since it throws for one it has no dispatch key for (meta).
bool extension_serves(PyObject* choice, c10::DeviceType device) {
  return extension_chosen(choice, device) && !at::autocast::is_autocast_enabled(device);
}

// The tensor `obj`, when it is one the kernels take (float32, float16 or bfloat16) and no __torch_function__
// must see the call: a torch.Tensor or nn.Parameter, not a subclass, with no torch function mode active. Else null.
const Tensor* kernel_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj) || at::impl::torch_function_mode_enabled()) {
    return nullptr;
  }
  const Tensor& tensor = THPVariable_Unpack(obj);
  return is_kernel_dtype(tensor.scalar_type()) ? &tensor : nullptr;
}

// A weight or bias argument: nullopt for None; false when it is not a kernel tensor on `input`'s device with the
// shape `shape`.
bool read_parameter(PyObject* obj, const Tensor& input, at::IntArrayRef shape, std::optional<Tensor>& param) {
  if (obj == Py_None) {
    return true;
  }
  const Tensor* tensor = kernel_tensor(obj);
  if (tensor == nullptr || tensor->device() != input.device() || tensor->sizes() != shape) {
    return false;
  }
  param = *tensor;
  return true;
}

bool read_int(PyObject* obj, int64_t& value) {
  if (!PyLong_Check(obj)) {
    return false;
  }
  value = PyLong_AsLongLong(obj);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// `normalized_shape` (an int, or a tuple or list of ints), when it names the last dims of `input`.
bool read_normalized_shape(PyObject* obj, const Tensor& input, std::vector<int64_t>& shape) {
  int64_t size = 0;
  if (read_int(obj, size)) {
    shape.push_back(size);
  } else if (PyTuple_Check(obj) || PyList_Check(obj)) {
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    for (Py_ssize_t i = 0; i < count; ++i) {
      if (!read_int(items[i], size)) {
        return false;
      }
      shape.push_back(size);
    }
  } else {
    return false;
  }
  const int64_t dims = static_cast<int64_t>(shape.size());
  return dims >= 1 && dims <= input.dim() && input.sizes().slice(input.dim() - dims) == at::IntArrayRef(shape);
}

bool read_float(PyObject* obj, double& value) {
  if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
    return false;
  }
  value = PyFloat_AsDouble(obj);
  if (value == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// Run `call` (which returns the output tensor) without the GIL, as torch's own bindings run their operators.
template <typename Call>
PyObject* run(const Call& call) {
  Tensor output;
  {
    pybind11::gil_scoped_release no_gil;
    output = call();
  }
  return THPVariable_Wrap(std::move(output));
}

bool has_args(Py_ssize_t nargs, Py_ssize_t expected) {
  if (nargs != expected) {
    PyErr_Format(PyExc_TypeError, "expected %zd positional arguments, got %zd", expected, nargs);
    return false;
  }
  return true;
}

// layer_norm(choice, input, normalized_shape, weight, bias, eps)
PyObject* layer_norm(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!has_args(nargs, 6)) {
    return nullptr;
  }
  const Tensor* input = kernel_tensor(args[1]);
  std::vector<int64_t> shape;
  std::optional<Tensor> weight, bias;
  double eps = 0;
  if (input == nullptr || !extension_serves(args[0], input->device().type()) ||
      !read_normalized_shape(args[2], *input, shape) || !read_parameter(args[3], *input, shape, weight) ||
      !read_parameter(args[4], *input, shape, bias) || !read_float(args[5], eps)) {
    Py_RETURN_NONE;
  }
  static const auto op = typed_operator<Tensor(const Tensor&, at::IntArrayRef, const std::optional<Tensor>&,
                                         const std::optional<Tensor>&, double)>("lmrt_C::layer_norm");
  return run([&] { return op.call(*input, shape, weight, bias, eps); });
  END_HANDLE_TH_ERRORS
}

// rms_norm(choice, input, normalized_shape, weight, eps): eps None is float32's machine epsilon, the computation's.
PyObject* rms_norm(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!has_args(nargs, 5)) {
    return nullptr;
  }
  const Tensor* input = kernel_tensor(args[1]);
  std::vector<int64_t> shape;
  std::optional<Tensor> weight;
  double eps = std::numeric_limits<float>::epsilon();
  if (input == nullptr || !extension_serves(args[0], input->device().type()) ||
      !read_normalized_shape(args[2], *input, shape) || !read_parameter(args[3], *input, shape, weight) ||
      (args[4] != Py_None && !read_float(args[4], eps))) {
    Py_RETURN_NONE;
  }
  static const auto op = typed_operator<Tensor(const Tensor&, at::IntArrayRef, const std::optional<Tensor>&, double)>(
      "lmrt_C::rms_norm");
  return run([&] { return op.call(*input, shape, weight, eps); });
  END_HANDLE_TH_ERRORS
}

// softmax(choice, input, dim, dtype, log): dtype None keeps the input's.
PyObject* softmax(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!has_args(nargs, 5)) {
    return nullptr;
  }
  const Tensor* input = kernel_tensor(args[1]);
  int64_t dim = 0;
  if (input == nullptr || input->dim() == 0 || !extension_serves(args[0], input->device().type()) ||
      !read_int(args[2], dim) || dim < -input->dim() || dim >= input->dim() ||
      (args[3] != Py_None && !(THPDtype_Check(args[3]) && is_kernel_dtype(((THPDtype*)args[3])->scalar_type))) ||
      !PyBool_Check(args[4])) {
    Py_RETURN_NONE;
  }
  const at::ScalarType out_dtype = args[3] == Py_None ? input->scalar_type() : ((THPDtype*)args[3])->scalar_type;
  const bool log = args[4] == Py_True;
  static const auto op = typed_operator<Tensor(const Tensor&, int64_t, at::ScalarType, bool)>("lmrt_C::softmax");
  return run([&] { return op.call(*input, dim, out_dtype, log); });
  END_HANDLE_TH_ERRORS
}

// Whether the attention kernels take these (batch, heads, rows, dim) tensors as lmrt.ops would pass them on: one
// dtype and device, equal batch sizes (broadcasting is the Python path's), the key and value heads dividing the
// query's (as grouped-query attention under `enable_gqa`, or one shared head), equal head dims for query and key,
// as many values as keys, and head dims the CUDA kernels take on a GPU.
bool attention_served(const Tensor& q, const Tensor& k, const Tensor& v, bool enable_gqa) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || k.scalar_type() != q.scalar_type() ||
      v.scalar_type() != q.scalar_type() || k.device() != q.device() || v.device() != q.device() ||
      k.size(0) != q.size(0) || v.size(0) != q.size(0) || k.size(1) != v.size(1) || k.size(1) == 0 ||
      q.size(1) % k.size(1) != 0 || (k.size(1) != q.size(1) && k.size(1) != 1 && !enable_gqa) ||
      k.size(3) != q.size(3) || k.size(2) != v.size(2)) {
    return false;
  }
  if (q.is_cuda()) {
    static const auto unsupported =
        typed_operator<std::string(const Tensor&, const Tensor&, const Tensor&)>("lmrt_C::cuda_attention_unsupported");
    return unsupported.call(q, k, v).empty();
  }
  return true;
}

// A bool or floating `attn_mask` that needs no gradient, expanded to the scores' shape (batch, heads, q_len, k_len)
// (a view: broadcast dims get stride 0); false when it is none of these or does not broadcast.
bool read_mask(PyObject* obj, const Tensor& q, const Tensor& k, std::optional<Tensor>& mask) {
  if (obj == Py_None) {
    return true;
  }
  if (!THPVariable_CheckExact(obj)) {
    return false;
  }
  const Tensor& tensor = THPVariable_Unpack(obj);
  const std::array<int64_t, 4> scores{q.size(0), q.size(1), q.size(2), k.size(2)};
  if (!(tensor.scalar_type() == at::kBool || is_kernel_dtype(tensor.scalar_type())) || tensor.requires_grad() ||
      tensor.device() != q.device() || !at::is_expandable_to(tensor.sizes(), scores)) {
    return false;
  }
  mask = tensor.expand(scores);
  return true;
}

// attention(choice, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa): scale None is
// 1/sqrt(head dim), or 1 for head dim 0 (lmrt.reference.default_scale); only calls without dropout are served.
PyObject* attention(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!has_args(nargs, 9)) {
    return nullptr;
  }
  const Tensor* q = kernel_tensor(args[1]);
  const Tensor* k = kernel_tensor(args[2]);
  const Tensor* v = kernel_tensor(args[3]);
  double dropout_p = 1, scale = 0;
  if (q == nullptr || k == nullptr || v == nullptr || !extension_serves(args[0], q->device().type()) ||
      !PyBool_Check(args[6]) || !PyBool_Check(args[8]) || !attention_served(*q, *k, *v, args[8] == Py_True) ||
      !read_float(args[5], dropout_p) || dropout_p != 0 || (args[7] != Py_None && !read_float(args[7], scale))) {
    Py_RETURN_NONE;
  }
  std::optional<Tensor> mask;
  if (!read_mask(args[4], *q, *k, mask)) {
    Py_RETURN_NONE;
  }
  if (args[7] == Py_None) {
    scale = q->size(3) > 0 ? 1.0 / std::sqrt(static_cast<double>(q->size(3))) : 1.0;
  }
  const bool causal = args[6] == Py_True;
  static const auto op =
      typed_operator<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, bool, double)>(
          "lmrt_C::attention");
  return run([&] { return op.call(*q, *k, *v, mask, causal, scale); });
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"layer_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_norm)), METH_FASTCALL,
     "lmrt.ops.layer_norm's eager call: (choice, input, normalized_shape, weight, bias, eps) -> Tensor or None"},
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(rms_norm)), METH_FASTCALL,
     "lmrt.ops.rms_norm's eager call: (choice, input, normalized_shape, weight, eps) -> Tensor or None"},
    {"softmax", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(softmax)), METH_FASTCALL,
     "lmrt.ops.softmax's and log_softmax's eager call: (choice, input, dim, dtype, log) -> Tensor or None"},
    {"attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(attention)), METH_FASTCALL,
     "lmrt.ops.scaled_dot_product_attention's eager call: (choice, query, key, value, attn_mask, dropout_p, "
     "is_causal, scale, enable_gqa) -> Tensor or None"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// `import lmrt._C` loads this library, which also registers the operators torch.ops.lmrt_C.* (lmrt_ops.cpp,
// autograd.cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "lmrt's C++/CUDA kernels (as torch.ops.lmrt_C) and the eager calls of lmrt.ops", -1,
                               methods};
  return PyModule_Create(&module);
}

// fastssl._C: the compiled kernels of fastssl.
//
// Each op lives in its own file (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) and registers its
// schema with TORCH_LIBRARY_FRAGMENT(fastssl, ...) and its kernels with
// TORCH_LIBRARY_IMPL(fastssl, <device>, ...). Importing this module runs those static
// registrations; Python reaches the ops as torch.ops.fastssl.<name> and attaches autograd and
// fake (meta) implementations in fastssl/cpp/<op>.py.
//
// No pybind11 here on purpose: the module itself exports nothing, which keeps the build light
// (no torch/extension.h) and the ABI surface nil.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/common.h"

namespace fastssl {

static std::string build_info() {
  std::string s = "cpu";
#if defined(FASTSSL_X86)
  s += " (x86-64: runtime-selected x86-64-v4 AVX-512 / x86-64-v3 AVX2+FMA / baseline clones)";
#else
  s += " (portable scalar/auto-vectorised build)";
#endif
#if defined(FASTSSL_WITH_CUDA)
  s += ", cuda";
#endif
  s += blas_info();
  return s;
}

}  // namespace fastssl

TORCH_LIBRARY(fastssl, m) {
  m.def("build_info() -> str", &fastssl::build_info);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

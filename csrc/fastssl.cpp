// fastssl._C: the compiled kernels of fastssl.
//
// Each op's kernels live in their own file (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) and register
// with TORCH_LIBRARY_IMPL(fastssl, <device>, ...). The schemas, fakes and autograd formulas
// are defined once, in Python (fastssl/ops/<op>.py), for every device; importing this module
// runs the static kernel registrations (before or after the Python definitions: the
// dispatcher accepts either order and checks the C++ signatures against the schemas).
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

// The op schemas are defined in Python (fastssl/ops/<op>.py, one place for both devices);
// the C++ files register only their CPU (and CUDA) kernels. build_info is C++-only.
TORCH_LIBRARY_FRAGMENT(fastssl, m) {
  m.def("build_info() -> str", &fastssl::build_info);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

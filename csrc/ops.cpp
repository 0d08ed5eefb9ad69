// Schemas of the smog:: operators. Implementations register per dispatch key:
// csrc/cpu/*.cpp under CPU, csrc/cuda/*.cu under CUDA; fake (meta) kernels live in
// smog_kernels/fakes.py so the ops trace under torch.compile.
#include <torch/library.h>
#ifdef SMOG_PYTHON_MODULE
#include <Python.h>
#endif

TORCH_LIBRARY(smog, m) {
  // argmax_k <x_i, c_k> with ties to the smallest k -> (index int64 [N], score float32 [N])
  m.def("assign(Tensor x, Tensor groups) -> (Tensor, Tensor)");
  // per-group float32 sums [K, D] and int64 counts [K] of the rows of x
  m.def("group_stats(Tensor x, Tensor index, int num_groups) -> (Tensor, Tensor)");
  // rows with count > 0: normalize(beta * c + (1 - beta) * sum / count); others unchanged
  m.def("momentum_update(Tensor groups, Tensor sums, Tensor counts, float beta) -> Tensor");
  // one streaming pass: (lse float32 [N], target logits float32 [T, N],
  //                      attention float32 [N, D] = sum_k softmax_k c_k)
  m.def("loss_forward(Tensor p, Tensor groups, Tensor targets, float inv_temperature)"
        " -> (Tensor, Tensor, Tensor)");
  // inv_temperature * sum_b row_weight[b] softmax_bk p_b -> float32 [K, D]
  m.def("loss_group_grad(Tensor p, Tensor groups, Tensor lse, Tensor row_weight,"
        " float inv_temperature) -> Tensor");
}

#ifdef SMOG_PYTHON_MODULE
// `import smog_kernels._C` loads this library, which registers the operators above. (setup.py
// defines SMOG_PYTHON_MODULE; the CMake build for C++ users links no Python.)
static struct PyModuleDef smog_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&smog_c_module); }
#endif

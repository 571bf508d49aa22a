// Schemas of the rmi_ext custom ops (implementations: cpu/rmi_cpu.cpp, cuda/rmi_cuda.cu;
// fake/meta kernels for torch.compile: rmi_ext/_ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rmi_ext, m) {
  // Stages (a)+(b): first-term sums, non-finite count, region means and centred moments.
  //   logits [N, C, H, W] or [N, C, D, H, W] (f16/bf16/f32/f64, any strides), labels
  //   [N, H, W] or [N, D, H, W] (uint8/int8/int16/int32/int64) or a float target of the logits'
  //   shape with an optional bool mask [N, H, W] / [N, D, H, W] (the CPU kernels only); radius,
  //   stride, pool_size one side per spatial axis (the CUDA kernels: 2-D, equal sides)
  //   -> base_sum f64[], base_count f64[], nonfinite i64[], means f64[N, C, 2, d],
  //      cov f64[N, C, 3, d, d] (Sy, Sp, B)
  m.def("forward_stats(Tensor logits, Tensor labels, int[] radius, int[] stride, str pool, "
        "int[] pool_size, int ignore_index, str mode, Tensor? mask=None) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Stages (d)+(e): grad_logits (the logits' shape) in the logits' dtype and memory format.
  //   base_scale f64[], coef f64[N, C, 2, d, d] (Cp, Cy), shift f64[N, C, d]
  m.def("backward_grad(Tensor logits, Tensor labels, Tensor base_scale, Tensor coef, "
        "Tensor shift, int[] radius, int[] stride, str pool, int[] pool_size, int ignore_index, "
        "str mode, Tensor? mask=None) -> Tensor");
}

// `import rmi_ext._C` loads this library and runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

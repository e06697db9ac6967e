// The argument contract of every mmfast operator, checked in C++ for every backend
// (mmfast/_args.py calls it for the pure-PyTorch and Triton backends; the CPU and CUDA
// operators call it themselves). mmfast/_args.py holds a Python transcription with the
// same messages for builds without the extension (tests/test_args.py compares them).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace mmfast {

// One index-aligned tensor list of a call; lists[0] is the reference ("out" or "grads").
struct NamedList {
  std::string name;
  at::TensorList tensors;
  bool written;  // the op writes these tensors
};

// Per index i, for every list in order: a supported floating dtype, the dtype, device
// (of lists[0][0]) and shape of lists[0][i], contiguous; a written tensor is not an
// inference tensor outside inference mode. Then memory: a written tensor may be the
// very same memory as a same-index tensor of another list (in place), and shares no
// byte with anything else. groups: one id >= -1 per index; fusion: none or
// one 0/1 per index. Returns the number of groups (largest id + 1). Throws ValueError /
// TypeError with a message naming the argument.
int64_t check_args(const std::vector<NamedList>& lists, at::IntArrayRef groups, at::IntArrayRef fusion);

// Bumps the autograd version counter of every tensor of a list the op writes (the
// ADInplaceOrView kernels of the operators; torch's in-place ops do the same).
void bump_versions(at::TensorList written);

}  // namespace mmfast

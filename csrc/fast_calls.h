// Direct entries from Python to the mmfast operators (mmfast/_ops.py): pybind11 reads
// the tensor lists (about 50 ns a tensor) and the op is called through the dispatcher,
// so subclasses, modes and autograd's version counters are handled as for torch.ops;
// torch.ops' generic argument parsing costs about 0.4 us a tensor, which dominated a
// call on small tensors. Under torch.compile, mmfast/_ops.py calls torch.ops instead.
#pragma once

#include <torch/extension.h>

namespace mmfast {
void add_fast_calls(pybind11::module_& m);
}  // namespace mmfast

// The weighting step of aggregate_ on device memory (weightings.cu), for multi.cu's fused op.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../solvers.h"

namespace mmfast::cuda {

// per [T, K, K] float64 (contiguous, on the current device) -> (gram [G, K, K], w [G, K],
// coefs [T, K]), all float64 on per's device, queued on the current stream: no host
// sync. layout: ids [T], first [G + 2], order [T] (mmfast/_multi.py builds it once per
// layout); its contents are not read on the host (that would synchronise): entries out of
// range are skipped on the device instead of read.
std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_weights_on_device(const at::Tensor& per,
                                                                            const at::Tensor& layout, int64_t G,
                                                                            const solve::Params& p,
                                                                            std::optional<double> gamma);

}  // namespace mmfast::cuda

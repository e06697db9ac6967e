// The weighting step of aggregate_ on host memory (weightings.cpp), for multi.cpp's fused op.
#pragma once

#include <cstdint>
#include <optional>

#include "../solvers.h"

namespace mmfast::cpu {

// per [T, K, K] -> gram [G, K, K] (group sums in tensor order), w [G, K], coefs [T, K];
// layout: ids [T], first [G + 2], order [T] (mmfast/_multi.py). Checks the layout.
void aggregate_weights_into(const double* per, int64_t T, int64_t K, const int64_t* layout, int64_t G,
                            const solve::Params& p, std::optional<double> gamma, double* gram, double* w, double* coefs);

}  // namespace mmfast::cpu

// The argument contract (args.h). Costs O(T log T) per call for T tensors, all in C++.
#include "args.h"

#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <sstream>

namespace mmfast {
namespace {

std::string dtype_name(at::ScalarType s) { return "torch." + std::string(c10::getDtypeNames(s).first); }

// As Python prints tuple(t.shape): "()", "(3,)", "(2, 3)".
std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

bool supported(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

struct Span {
  uintptr_t begin, end;
  size_t list, index;
};

std::string where(const std::vector<NamedList>& lists, const Span& s) {
  return lists[s.list].name + "[" + std::to_string(s.index) + "]";
}

}  // namespace

int64_t check_args(const std::vector<NamedList>& lists, at::IntArrayRef groups, at::IntArrayRef fusion) {
  const NamedList& first = lists.at(0);
  const size_t n = first.tensors.size();
  TORCH_CHECK_VALUE(n > 0, first.name, ": expected at least one tensor, got an empty list");
  for (const NamedList& l : lists)
    TORCH_CHECK_VALUE(l.tensors.size() == n, l.name, ": expected ", n, " tensors (as many as ", first.name,
                      "), got ", l.tensors.size());
  const bool inference = c10::InferenceMode::is_enabled();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& like = first.tensors[i];
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.tensors[i];
      const std::string arg = l.name + "[" + std::to_string(i) + "]";
      TORCH_CHECK_VALUE(t.defined(), arg, ": expected a tensor, got None");
      TORCH_CHECK_TYPE(supported(t.scalar_type()), arg,
                       ": expected a floating dtype (float16, bfloat16, float32, float64), got ",
                       dtype_name(t.scalar_type()));
      TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), arg, ": expected dtype ",
                       dtype_name(like.scalar_type()), " (as ", first.name, "[", i, "]), got ",
                       dtype_name(t.scalar_type()));
      TORCH_CHECK_VALUE(t.device() == first.tensors[0].device(), arg, ": expected device ",
                        first.tensors[0].device().str(), " (as ", first.name, "[0]), got ", t.device().str());
      TORCH_CHECK_VALUE(t.sizes() == like.sizes(), arg, ": expected shape ", shape_str(like.sizes()), " (as ",
                        first.name, "[", i, "]), got ", shape_str(t.sizes()));
      TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.is_contiguous(), arg,
                        ": expected a contiguous tensor (call .contiguous() first)");
      TORCH_CHECK_VALUE(!l.written || inference || !t.is_inference(), arg,
                        ": is an inference tensor, which cannot be written outside torch.inference_mode() "
                        "(clone it first, as torch's in-place ops require)");
    }
  }

  // Memory: written spans must be disjoint from every other span, except a same-index
  // span they coincide with exactly (in place).
  std::vector<Span> written, read;
  for (size_t l = 0; l < lists.size(); ++l) {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& t = lists[l].tensors[i];
      if (t.numel() == 0 || t.device().type() == at::kMeta) continue;
      const auto b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      (lists[l].written ? written : read).push_back({b, b + t.numel() * t.element_size(), l, i});
    }
  }
  auto by_begin = [](const Span& x, const Span& y) {
    return x.begin != y.begin ? x.begin < y.begin : (x.list != y.list ? x.list < y.list : x.index < y.index);
  };
  std::sort(written.begin(), written.end(), by_begin);
  for (size_t k = 1; k < written.size(); ++k) {
    const Span& x = written[k - 1];
    const Span& y = written[k];
    if (y.begin < x.end) {
      const bool x_first = x.list != y.list ? x.list < y.list : x.index < y.index;
      TORCH_CHECK_VALUE(false, where(lists, x_first ? y : x), ": overlaps ", where(lists, x_first ? x : y),
                        " in memory; a tensor the op writes may share memory with nothing else");
    }
  }
  for (const Span& r : read) {
    auto it = std::upper_bound(written.begin(), written.end(), r.begin,
                               [](uintptr_t v, const Span& w) { return v < w.end; });
    for (; it != written.end() && it->begin < r.end; ++it) {
      const bool in_place = it->index == r.index && it->begin == r.begin && it->end == r.end;
      TORCH_CHECK_VALUE(in_place, where(lists, *it), ": overlaps ", where(lists, r),
                        " in memory; it may only be the very same memory as an input of the same index "
                        "(in place) or share none");
    }
  }

  TORCH_CHECK_VALUE(groups.size() == n, "groups: expected ", n, " entries (one per tensor), got ", groups.size());
  int64_t num_groups = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    TORCH_CHECK_VALUE(groups[i] >= -1, "groups[", i, "]: expected a group id >= 0, or -1 for outside every group, got ",
                      groups[i]);
    num_groups = std::max<int64_t>(num_groups, groups[i] + 1);
  }
  TORCH_CHECK_VALUE(fusion.empty() || fusion.size() == n, "fusion: expected ", n, " entries (one per tensor), got ",
                    fusion.size());
  for (size_t i = 0; i < fusion.size(); ++i)
    TORCH_CHECK_VALUE(fusion[i] == 0 || fusion[i] == 1, "fusion[", i, "]: expected a bool, got ", fusion[i]);
  return num_groups;
}

void bump_versions(at::TensorList written) {
  for (const at::Tensor& t : written)
    if (!t.is_inference()) torch::autograd::impl::bump_version(t);
}

}  // namespace mmfast

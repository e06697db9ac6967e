// The argument contract (args.h). Costs O(T log T) per call for T tensors, all in C++.
#include "args.h"
#include "fast_calls.h"

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
  ++layout_counters().checks;
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
      // TORCH_CHECK formats its message only on failure: no string work per tensor.
#define arg l.name, "[", i, "]"
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
#undef arg
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

LayoutCounters& layout_counters() {
  static LayoutCounters counters;
  return counters;
}

LayoutKey layout_key(int64_t op, const std::vector<NamedList>& lists, at::IntArrayRef groups,
                     at::IntArrayRef fusion) {
  const size_t n = lists.empty() ? 0 : lists[0].tensors.size();
  LayoutKey key;
  std::vector<int64_t>& w = key.words;
  w.reserve(4 + n * (2 * lists.size() + 3) + groups.size() + fusion.size());
  w.push_back(op);
  w.push_back(static_cast<int64_t>(lists.size()) | (int64_t{c10::InferenceMode::is_enabled()} << 32));
  for (const NamedList& l : lists) w.push_back(static_cast<int64_t>(l.tensors.size()) | (int64_t{l.written} << 40));
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& like = lists[0].tensors[i];
    const bool like_ok = like.defined();
    for (const NamedList& l : lists) {
      const at::Tensor& t = l.tensors.size() > i ? l.tensors[i] : like;
      if (!t.defined()) {
        w.push_back(0);
        w.push_back(0);
        continue;
      }
      const c10::Device d = t.device();
      const bool same_shape = like_ok && t.sizes() == like.sizes();
      const bool dense = t.layout() == at::kStrided && t.has_storage();
      w.push_back(dense ? reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()->unsafe_storage().data()) +
                              t.storage_offset() * static_cast<int64_t>(t.itemsize())
                        : 0);
      w.push_back(static_cast<int64_t>(t.scalar_type()) | (static_cast<int64_t>(d.type()) << 8) |
                  (static_cast<int64_t>(d.index() + 1) << 16) | (int64_t{t.layout() == at::kStrided} << 32) |
                  (int64_t{t.layout() == at::kStrided && t.is_contiguous()} << 33) | (int64_t{t.is_inference()} << 34) |
                  (int64_t{same_shape} << 35) | (int64_t{1} << 36));
    }
    if (like_ok) {
      w.push_back(like.dim());
      for (int64_t s : like.sizes()) w.push_back(s);
    }
  }
  w.push_back(static_cast<int64_t>(groups.size()));
  w.insert(w.end(), groups.begin(), groups.end());
  w.push_back(static_cast<int64_t>(fusion.size()));
  w.insert(w.end(), fusion.begin(), fusion.end());
  // FNV-1a over the words' bytes, 8 at a time: cheap, and a collision only costs a
  // rebuild (LayoutCache compares the words).
  uint64_t h = 1469598103934665603ull;
  for (int64_t x : w) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
  key.hash = static_cast<size_t>(h);
  return key;
}

void bump_versions(at::TensorList written) {
  for (const at::Tensor& t : written)
    if (!t.is_inference()) torch::autograd::impl::bump_version(t);
}

void bump_written_then_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias && alias->isWrite()) {
      const c10::IValue& v = (*stack)[first + i];
      if (v.isTensorList()) bump_versions(v.toTensorList().vec());
      else if (v.isTensor()) bump_versions({v.toTensor()});
    }
  }
  op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace mmfast

namespace mmfast {

void add_fast_calls(pybind11::module_& m) {
  using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  m.def(
      "combine_",
      [](const std::vector<at::Tensor>& out, const std::vector<at::Tensor>& grads_mm,
         const std::vector<at::Tensor>& grads_uni, const std::vector<int64_t>& groups,
         const std::vector<int64_t>& fusion, const std::string& method, double gamma, double alpha,
         std::optional<double> max_norm) -> Stats {
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("mmfast::combine_", "")
                                   .typed<Stats(at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef,
                                                at::IntArrayRef, c10::string_view, double, double,
                                                std::optional<double>)>();
        return op.call(out, grads_mm, grads_uni, groups, fusion, method, gamma, alpha, max_norm);
      },
      "mmfast::combine_ through the dispatcher (csrc/fast_calls.h).");
  m.def(
      "clip_",
      [](const std::vector<at::Tensor>& grads, const std::vector<int64_t>& groups, std::optional<double> max_norm) {
        using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
        static const auto op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("mmfast::clip_", "")
                                   .typed<Out(at::TensorList, at::IntArrayRef, std::optional<double>)>();
        return op.call(grads, groups, max_norm);
      },
      "mmfast::clip_ through the dispatcher (csrc/fast_calls.h).");
  // check_args for the backends that are not an operator of this extension (torch,
  // foreach, triton): the full checks once per layout, then a fingerprint per call.
  m.def(
      "check_args_cached",
      [](const std::vector<std::string>& names, const std::vector<std::vector<at::Tensor>>& lists, int64_t n_written,
         const std::vector<int64_t>& groups, const std::vector<int64_t>& fusion) {
        static LayoutCache<CachedLayout> cache(64);
        std::vector<NamedList> named;
        named.reserve(lists.size());
        for (size_t l = 0; l < lists.size(); ++l)
          named.push_back({names.at(l), lists[l], static_cast<int64_t>(l) < n_written});
        // Names are part of the contract's messages, not of the layout: a hit means the same checks pass.
        auto entry = cache.get(layout_key(kOpPython, named, groups, fusion), [&] {
          auto e = std::make_shared<CachedLayout>();
          e->num_groups = check_args(named, groups, fusion);
          return e;
        });
        return entry->num_groups;
      },
      "check_args (csrc/args.h), cached per layout.");
}

}  // namespace mmfast

// The argument contract of every mmfast operator, checked in C++ for every backend
// (mmfast/_args.py calls it for the pure-PyTorch and Triton backends; the CPU and CUDA
// operators call it themselves). mmfast/_args.py holds a Python transcription with the
// same messages for builds without the extension (tests/test_args.py compares them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
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

// A boxed ADInplaceOrView kernel: bump_versions of every argument the schema marks as
// written (Tensor(a!) / Tensor(a!)[]), then the backend kernel.
void bump_written_then_redispatch(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack);

// ---------------------------------------------------------------- layouts
//
// A call's layout: every property of its arguments that check_args and the chunk tables
// depend on. Per tensor of every list: its address and one word of dtype, device,
// contiguity, inference-ness, definedness and "same shape as lists[0][i]"; the shapes of
// lists[0]; the group ids, the fusion flags, whether inference mode is on, and an
// operator tag. Two calls with equal keys pass or fail check_args alike and address the
// same memory the same way, so everything built from the first is valid for the second.
// Building a key reads a few TensorImpl fields per tensor (no allocation but the vector):
// the per-call host cost of an operator after its first call with a layout.
struct LayoutKey {
  std::vector<int64_t> words;
  size_t hash = 0;
};

LayoutKey layout_key(int64_t op, const std::vector<NamedList>& lists, at::IntArrayRef groups,
                     at::IntArrayRef fusion);

// Operator tags of layout_key: one per operator family that caches layouts.
enum LayoutOp : int64_t { kOpCombine = 1, kOpClip = 2, kOpGram = 3, kOpPython = 4 };

// A bounded, thread-safe LRU cache of what an operator builds once per layout (the checks
// passed, chunk tables, device metadata). Entries are handed out as shared_ptr, so an
// entry evicted while another thread still uses it lives until that thread is done.
// Device tables inside an entry are freed by their tensors' destructors through the
// caching allocator, which keeps them from reuse until the streams they were used on
// (recorded by the CUDA backend) have passed them: a queued kernel never reads freed
// memory. Entries used inside a CUDA-graph capture are pinned (never evicted): a graph
// replays its kernels, table pointers included, long after the call returned.
template <class Entry>
class LayoutCache {
 public:
  explicit LayoutCache(size_t capacity) : capacity_(capacity) {}

  // The entry of key, or nullptr (and the key back to the caller) on a miss.
  std::shared_ptr<Entry> find(const LayoutKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key.hash);
    if (it == index_.end() || it->second->key.words != key.words) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);  // most recent first
    return it->second->entry;
  }

  // Inserts what build() made for key (built outside the lock: it may throw, or take long).
  std::shared_ptr<Entry> insert(LayoutKey&& key, std::shared_ptr<Entry> entry) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key.hash);
    if (it != index_.end()) lru_.erase(it->second);  // the same key built twice, or a hash collision
    lru_.push_front(Node{std::move(key), entry});
    index_[lru_.front().key.hash] = lru_.begin();
    size_t unpinned = 0;
    for (const Node& n : lru_) unpinned += !n.entry->pinned;
    for (auto e = lru_.end(); unpinned > capacity_ && e != lru_.begin();) {
      --e;
      if (e->entry->pinned) continue;
      index_.erase(e->key.hash);
      e = lru_.erase(e);
      --unpinned;
    }
    return entry;
  }

  template <class Build>
  std::shared_ptr<Entry> get(LayoutKey&& key, const Build& build) {
    if (auto hit = find(key)) return hit;
    return insert(std::move(key), build());
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return lru_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    lru_.clear();
    index_.clear();
  }

 private:
  struct Node {
    LayoutKey key;
    std::shared_ptr<Entry> entry;
  };
  std::mutex mu_;
  size_t capacity_;
  std::list<Node> lru_;
  std::unordered_map<size_t, typename std::list<Node>::iterator> index_;
};

// What every cached entry carries.
struct CachedLayout {
  std::atomic<bool> pinned{false};  // only ever false -> true (a capture used it)
  int64_t num_groups = 0;
};

// Counters for tests: how many times the full argument checks and layout builds ran.
struct LayoutCounters {
  std::atomic<int64_t> checks{0};
};
LayoutCounters& layout_counters();

}  // namespace mmfast

// Linked when the extension is built without CUDA.
namespace mmfast {
bool cuda_built() { return false; }
}  // namespace mmfast

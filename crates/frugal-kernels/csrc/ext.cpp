// Frugal's libtorch extension: what tch does not expose.
//
// - A generic autograd function whose forward and backward call back into Rust.
// - The current CUDA stream, CUDA graph capture and replay, and the caching allocator's
//   statistics (compiled only when the libtorch has CUDA, FRUGAL_WITH_CUDA).
//
// Every entry point is extern "C", catches every C++ exception and returns it as a malloc'd
// message (null on success) that Rust frees with frugal_ext_free_string. Tensors cross the
// boundary as `at::Tensor*`, the representation tch uses: a pointer handed to Rust is a new
// heap tensor that Rust owns (tch deletes it), a pointer handed to C++ is borrowed.

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#ifdef FRUGAL_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, message.c_str(), message.size() + 1);
  }
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception in the frugal libtorch extension");
  }
}

// The Rust side of one autograd function call.
//
// `forward` and `backward` receive borrowed input pointers and push their results through
// frugal_ext_push (a null pointer pushes an undefined tensor, "no gradient"). They return null
// on success or a message allocated by Rust, released with `free_message`. `drop` releases
// `state` once the graph no longer needs it.
struct RustCallbacks {
  void* state;
  char* (*forward)(void* state, at::Tensor* const* inputs, size_t n, void* out);
  char* (*backward)(void* state, at::Tensor* const* grads, size_t n, void* out);
  void (*free_message)(char* message);
  void (*drop)(void* state);
};

struct RustHandle : torch::CustomClassHolder {
  explicit RustHandle(RustCallbacks cb) : cb(cb) {}
  ~RustHandle() override { cb.drop(cb.state); }
  RustHandle(const RustHandle&) = delete;
  RustHandle& operator=(const RustHandle&) = delete;
  RustCallbacks cb;
};

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

variable_list call_rust(char* (*fn)(void*, at::Tensor* const*, size_t, void*), RustHandle& h,
                        const variable_list& in) {
  std::vector<at::Tensor*> ptrs;
  ptrs.reserve(in.size());
  for (const auto& t : in) {
    ptrs.push_back(const_cast<at::Tensor*>(&t));
  }
  variable_list out;
  char* err = fn(h.cb.state, ptrs.data(), ptrs.size(), &out);
  if (err != nullptr) {
    std::string message(err);
    h.cb.free_message(err);
    throw std::runtime_error(message);
  }
  return out;
}

struct RustFunction : public torch::autograd::Function<RustFunction> {
  static variable_list forward(AutogradContext* ctx, at::TensorList inputs,
                               c10::intrusive_ptr<RustHandle> handle) {
    variable_list out = call_rust(handle->cb.forward, *handle, inputs.vec());
    ctx->saved_data["rust"] = at::IValue::make_capsule(handle);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto handle = c10::static_intrusive_pointer_cast<RustHandle>(
        ctx->saved_data["rust"].toCapsule());
    variable_list out = call_rust(handle->cb.backward, *handle, grads);
    // The autograd function takes the inputs and then the handle; the handle gets no gradient.
    out.emplace_back();
    return out;
  }
};

}  // namespace

extern "C" {

void frugal_ext_free_string(char* s) { std::free(s); }

// Appends `*t` to the result list `out` and deletes `t` (ownership passes from Rust); a null
// `t` appends an undefined tensor.
void frugal_ext_push(void* out, at::Tensor* t) {
  auto* list = static_cast<variable_list*>(out);
  if (t == nullptr) {
    list->emplace_back();
  } else {
    list->push_back(std::move(*t));
    delete t;
  }
}

// A new owned handle on the same tensor as `t`.
at::Tensor* frugal_ext_shallow_clone(at::Tensor* t) { return new at::Tensor(*t); }

// Applies the Rust function `cb` to `inputs` through autograd. Each output, which carries a
// grad_fn that calls `cb.backward`, is handed to `sink(sink_ctx, t)` as a new owned pointer.
// `cb.drop` runs exactly once, when the graph lets go of the function (at once on failure).
char* frugal_ext_apply(RustCallbacks cb, at::Tensor* const* inputs, size_t n_in,
                       void (*sink)(void* sink_ctx, at::Tensor* t), void* sink_ctx) {
  c10::intrusive_ptr<RustHandle> handle;
  try {
    handle = c10::make_intrusive<RustHandle>(cb);
  } catch (...) {
    cb.drop(cb.state);
    return copy_message("could not allocate the autograd handle");
  }
  return guarded([&] {
    variable_list in;
    in.reserve(n_in);
    for (size_t i = 0; i < n_in; ++i) {
      in.push_back(*inputs[i]);
    }
    // A TensorList argument makes every tensor an input of the graph node.
    variable_list out = RustFunction::apply(at::TensorList(in), handle);
    handle.reset();
    for (auto& t : out) {
      sink(sink_ctx, new at::Tensor(std::move(t)));
    }
  });
}

// libtorch's fused AdamW (torch.optim.AdamW(fused=True)) over `n` parameters in place: a
// baseline for Frugal's optimizer kernels. `steps` are f32 scalar tensors, incremented.
char* frugal_ext_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                             at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                             at::Tensor* const* steps, size_t n, double lr, double beta1,
                             double beta2, double weight_decay, double eps) {
  return guarded([&] {
    auto list = [n](at::Tensor* const* ts) {
      std::vector<at::Tensor> out;
      out.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        out.push_back(*ts[i]);
      }
      return out;
    };
    at::NoGradGuard no_grad;
    // As torch.optim.AdamW does: the counters advance before the fused kernel reads them.
    auto counters = list(steps);
    for (auto& step : counters) {
      step.add_(1);
    }
    at::_fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), {},
                      counters, lr, beta1, beta2, weight_decay, eps, false, false);
  });
}

// Whether autograd records operations on this thread now (torch.is_grad_enabled()).
int frugal_ext_grad_enabled(void) { return at::GradMode::is_enabled() ? 1 : 0; }

int frugal_ext_has_cuda(void) {
#ifdef FRUGAL_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

#ifdef FRUGAL_WITH_CUDA

// The current CUDA stream of `device` (a cudaStream_t).
char* frugal_ext_current_stream(int device, void** stream) {
  return guarded([&] {
    *stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  });
}

// The caching allocator's figures for `device`: allocated current and peak, reserved current
// and peak, in bytes.
char* frugal_ext_memory_stats(int device, int64_t* out4) {
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out4[0] = stats.allocated_bytes[agg].current;
    out4[1] = stats.allocated_bytes[agg].peak;
    out4[2] = stats.reserved_bytes[agg].current;
    out4[3] = stats.reserved_bytes[agg].peak;
  });
}

char* frugal_ext_reset_peak(int device) {
  return guarded([&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

char* frugal_ext_empty_cache(void) {
  return guarded([&] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

// Makes `device` current for a scope. (c10's CUDAGuard would compile its whole device-guard
// implementation, CUDA runtime calls included, into this object; the extension calls only
// functions that libc10_cuda and libtorch_cuda export, so it needs no libcudart of its own.)
struct DeviceScope {
  explicit DeviceScope(c10::DeviceIndex device) : previous(c10::cuda::ExchangeDevice(device)) {}
  ~DeviceScope() { c10::cuda::MaybeSetDevice(previous); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  c10::DeviceIndex previous;
};

// A CUDA graph and the side stream it is captured on; the stream that was current before
// capture_begin comes back at capture_end.
struct FrugalGraph {
  at::cuda::CUDAGraph graph;
  c10::DeviceIndex device;
  std::unique_ptr<c10::cuda::CUDAStream> previous;
};

char* frugal_ext_graph_new(int device, FrugalGraph** out) {
  return guarded([&] {
    auto g = std::make_unique<FrugalGraph>();
    g->device = static_cast<c10::DeviceIndex>(device);
    *out = g.release();
  });
}

void frugal_ext_graph_free(FrugalGraph* g) {
  try {
    if (g != nullptr && g->previous) {
      c10::cuda::setCurrentCUDAStream(*g->previous);
    }
    delete g;
  } catch (...) {
  }
}

// Begins capturing on a side stream, which becomes current; the side stream first waits for the
// work already queued on the previous current stream.
char* frugal_ext_graph_capture_begin(FrugalGraph* g) {
  return guarded([&] {
    if (g->previous) {
      throw std::runtime_error("this graph is already capturing");
    }
    DeviceScope scope(g->device);
    auto previous = c10::cuda::getCurrentCUDAStream(g->device);
    auto side = c10::cuda::getStreamFromPool(false, g->device);
    c10::cuda::device_synchronize();
    g->previous = std::make_unique<c10::cuda::CUDAStream>(previous);
    c10::cuda::setCurrentCUDAStream(side);
    try {
      g->graph.capture_begin();
    } catch (...) {
      c10::cuda::setCurrentCUDAStream(previous);
      g->previous.reset();
      throw;
    }
  });
}

char* frugal_ext_graph_capture_end(FrugalGraph* g) {
  return guarded([&] {
    if (!g->previous) {
      throw std::runtime_error("this graph is not capturing");
    }
    DeviceScope scope(g->device);
    auto previous = *g->previous;
    g->previous.reset();
    try {
      g->graph.capture_end();
    } catch (...) {
      c10::cuda::setCurrentCUDAStream(previous);
      throw;
    }
    c10::cuda::setCurrentCUDAStream(previous);
  });
}

char* frugal_ext_graph_replay(FrugalGraph* g) {
  return guarded([&] {
    DeviceScope scope(g->device);
    g->graph.replay();
  });
}

#else

namespace {
char* no_cuda() {
  return copy_message("this libtorch was built without CUDA (libc10_cuda was not found at build time)");
}
}  // namespace

struct FrugalGraph;
char* frugal_ext_current_stream(int, void**) { return no_cuda(); }
char* frugal_ext_memory_stats(int, int64_t*) { return no_cuda(); }
char* frugal_ext_reset_peak(int) { return no_cuda(); }
char* frugal_ext_empty_cache(void) { return no_cuda(); }
char* frugal_ext_graph_new(int, FrugalGraph**) { return no_cuda(); }
void frugal_ext_graph_free(FrugalGraph*) {}
char* frugal_ext_graph_capture_begin(FrugalGraph*) { return no_cuda(); }
char* frugal_ext_graph_capture_end(FrugalGraph*) { return no_cuda(); }
char* frugal_ext_graph_replay(FrugalGraph*) { return no_cuda(); }

#endif

}  // extern "C"

// One step of a captured CPU decode program (lmstack/model/cpu_graph.py), shared by every extension
// that contributes steps: the fused ops (cpu_ops.cpp) and the quantized kernels (compress/csrc).
//
// The extensions are separate shared libraries, so a step crosses between them as a Python capsule
// named kCapsuleName holding a plain C struct: a function, its state, and how to free the state. The
// program (cpu_ops.cpp's DecodeProgram) calls `run(state, position)` in order, with no Python in
// between; `position` is the decode position of the replayed token (where attention stores its k/v).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>

namespace lmstack_graph {

constexpr const char* kCapsuleName = "lmstack.graph_node";

struct Node {
  void (*run)(void* state, int64_t position);
  void* state;
  void (*destroy)(void* state);
};

// A capsule owning `fn` (a callable taking the position): the capture keeps its input and output
// tensors alive inside `fn`, so the addresses the step reads and writes stay valid while it exists.
template <class Fn>
pybind11::capsule make_node(Fn fn) {
  auto* node = new Node{[](void* state, int64_t position) { (*static_cast<Fn*>(state))(position); },
                        new Fn(std::move(fn)), [](void* state) { delete static_cast<Fn*>(state); }};
  return pybind11::capsule(node, kCapsuleName, [](void* pointer) {
    auto* owned = static_cast<Node*>(pointer);
    owned->destroy(owned->state);
    delete owned;
  });
}

}  // namespace lmstack_graph

// pybind11 bindings of npr's C++ classes, gathered into the one module npr._C (csrc/module.cpp).
// Each component defines its bind_* function in its own *_bind.cpp file.
#pragma once
#include <pybind11/pybind11.h>

namespace npr {
void bind_block_pool(pybind11::module_& m);  // csrc/block_pool_bind.cpp
void bind_scheduler(pybind11::module_& m);   // csrc/scheduler_bind.cpp
void bind_tree_attention_plan(pybind11::module_& m);  // csrc/tree_attention_plan.cpp
void bind_llama_layers(pybind11::module_& m);  // csrc/llama_layers.cpp
}  // namespace npr

// pybind11 binding of npr::BlockPool as npr._C.BlockPool (+ AppendResult, OutOfBlocksError).
// std::invalid_argument becomes ValueError (pybind11's default translation), npr::OutOfBlocks
// becomes npr._C.OutOfBlocksError (a MemoryError), std::logic_error (invariants) RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "block_pool.h"

namespace py = pybind11;

namespace npr {

void bind_block_pool(py::module_& m) {
  // A leaked handle (never decref'ed at exit, after the interpreter is gone).
  static py::handle out_of_blocks =
      py::exception<OutOfBlocks>(m, "OutOfBlocksError", PyExc_MemoryError).inc_ref();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfBlocks& e) {
      py::object err = py::reinterpret_borrow<py::object>(out_of_blocks)(py::str(e.what()));
      err.attr("needed") = e.needed;
      err.attr("available") = e.available;
      PyErr_SetObject(out_of_blocks.ptr(), err.ptr());
    }
  });

  py::class_<AppendResult>(m, "AppendResult",
                           "slots: physical slot of each new token; copies: (src_block, dst_block) "
                           "copy-on-write copies to apply to the KV cache before writing")
      .def_readonly("slots", &AppendResult::slots)
      .def_readonly("copies", &AppendResult::copies)
      .def("__repr__", [](const AppendResult& r) {
        return "AppendResult(slots=" + py::repr(py::cast(r.slots)).cast<std::string>() +
               ", copies=" + py::repr(py::cast(r.copies)).cast<std::string>() + ")";
      });

  py::class_<BlockPool>(m, "BlockPool",
                        "Paged KV block pool, refcounted copy-on-write tables (csrc/block_pool.h)")
      .def(py::init<int32_t, int32_t>(), py::arg("num_blocks"), py::arg("block_size") = 16)
      .def("create", &BlockPool::create, "a new empty table; returns its id")
      .def("append", &BlockPool::append, py::arg("table"), py::arg("n"))
      .def("seal", &BlockPool::seal, py::arg("table"))
      .def("fork", &BlockPool::fork, py::arg("table"), py::arg("n"))
      .def("join", &BlockPool::join, py::arg("parent"), py::arg("children"))
      .def("free", &BlockPool::free, py::arg("table"))
      .def("free_tree", &BlockPool::free_tree, py::arg("table"))
      .def(
          "entries",
          [](const BlockPool& p, int64_t t) {
            std::vector<std::pair<int32_t, int32_t>> out;
            for (const BlockEntry& e : p.entries(t)) out.emplace_back(e.block, e.fill);
            return out;
          },
          py::arg("table"), "list of (block, fill)")
      .def("slots", &BlockPool::slots, py::arg("table"))
      .def("num_tokens", &BlockPool::num_tokens, py::arg("table"))
      .def("blocks_needed", &BlockPool::blocks_needed, py::arg("table"), py::arg("n"))
      .def("sealed", &BlockPool::sealed, py::arg("table"))
      .def("frozen", &BlockPool::frozen, py::arg("table"))
      .def("parent", &BlockPool::parent, py::arg("table"))
      .def("children", &BlockPool::children, py::arg("table"))
      .def("has_table", &BlockPool::has_table, py::arg("table"))
      .def("num_free", &BlockPool::num_free)
      .def("num_used", &BlockPool::num_used)
      .def("num_blocks", &BlockPool::num_blocks)
      .def("block_size", &BlockPool::block_size)
      .def("refcount", &BlockPool::refcount, py::arg("block"))
      .def("refcounts",
           [](const BlockPool& p) {
             std::vector<int32_t> out(static_cast<size_t>(p.num_blocks()));
             for (int32_t b = 0; b < p.num_blocks(); ++b) out[b] = p.refcount(b);
             return out;
           })
      .def("num_tables", &BlockPool::num_tables)
      .def("table_ids", &BlockPool::table_ids)
      .def("check_invariants", &BlockPool::check_invariants);
}

}  // namespace npr

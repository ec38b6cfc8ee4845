// pybind11 binding of npr::Scheduler. Plans cross into Python as numpy arrays (torch.from_numpy
// wraps them without a copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "bindings.h"
#include "scheduler.h"

namespace py = pybind11;

namespace npr {
namespace {

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::None: return "";
    case Finish::Stop: return "stop";
    case Finish::Length: return "length";
    case Finish::Abort: return "abort";
    case Finish::InvalidStructure: return "invalid_structure";
  }
  return "";
}

Finish finish_from(const std::string& s) {
  if (s == "stop") return Finish::Stop;
  if (s == "length") return Finish::Length;
  if (s == "abort") return Finish::Abort;
  if (s == "invalid_structure") return Finish::InvalidStructure;
  throw std::invalid_argument("unknown finish reason '" + s + "'");
}

}  // namespace

void bind_scheduler(py::module_& m) {
  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init([](int64_t num_blocks, int64_t block_size, int64_t max_rows, int64_t max_tokens_per_step,
                       int64_t max_branches, std::vector<int32_t> tag_ids,
                       std::vector<std::vector<int32_t>> step_labels, int64_t max_model_len) {
             SchedulerConfig c;
             c.num_blocks = num_blocks;
             c.block_size = block_size;
             c.max_rows = max_rows;
             c.max_tokens_per_step = max_tokens_per_step;
             c.max_branches = max_branches;
             c.tag_ids = std::move(tag_ids);
             c.step_labels = std::move(step_labels);
             c.max_model_len = max_model_len;
             return std::make_unique<Scheduler>(std::move(c));
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("max_rows"), py::arg("max_tokens_per_step"),
           py::arg("max_branches"), py::arg("tag_ids"), py::arg("step_labels"),
           py::arg("max_model_len") = int64_t{1} << 30)
      .def("add_request",
           [](Scheduler& s, int64_t id, std::vector<int32_t> prompt, int32_t n, int64_t max_new_tokens,
              int64_t max_branch_tokens, int32_t mode, std::vector<int32_t> stop_ids) {
             if (mode < 0 || mode > 2) throw std::invalid_argument("mode must be 0 (native), 1 (sequential) or 2 (off)");
             RequestSpec r;
             r.id = id;
             r.prompt = std::move(prompt);
             r.n = n;
             r.max_new_tokens = max_new_tokens;
             r.max_branch_tokens = max_branch_tokens;
             r.mode = static_cast<Mode>(mode);
             r.stop_ids = std::move(stop_ids);
             s.add_request(std::move(r));
           },
           py::arg("request_id"), py::arg("prompt"), py::arg("n"), py::arg("max_new_tokens"),
           py::arg("max_branch_tokens"), py::arg("mode"), py::arg("stop_ids"))
      .def("schedule",
           [](Scheduler& s) {
             Plan p = s.schedule();
             py::dict d;
             d["input_ids"] = to_array(p.input_ids);
             d["positions"] = to_array(p.positions);
             d["slots"] = to_array(p.slots);
             d["q_indptr"] = to_array(p.q_indptr);
             d["seg_indptr"] = to_array(p.seg_indptr);
             d["seg_blocks"] = to_array(p.seg_blocks);
             d["seg_fills"] = to_array(p.seg_fills);
             d["row_seg_indptr"] = to_array(p.row_seg_indptr);
             d["row_segs"] = to_array(p.row_segs);
             d["row_node"] = to_array(p.row_node);
             d["sample_rows"] = to_array(p.sample_rows);
             d["logits_indices"] = to_array(p.logits_indices);
             d["sample_request"] = to_array(p.sample_request);
             d["sample_index"] = to_array(p.sample_index);
             d["sample_node"] = to_array(p.sample_node);
             d["sample_branch"] = to_array(p.sample_branch);
             d["sample_in_step"] = to_array(p.sample_in_step);
             d["copy_src"] = to_array(p.copy_src);
             d["copy_dst"] = to_array(p.copy_dst);
             d["num_preempted"] = p.num_preempted;
             return d;
           })
      .def("update", &Scheduler::update, py::arg("tokens"), py::arg("logprobs"))
      .def("finish_sample",
           [](Scheduler& s, int64_t id, int32_t sample, const std::string& reason, const std::string& detail) {
             s.finish_sample(id, sample, finish_from(reason), detail);
           },
           py::arg("request_id"), py::arg("sample"), py::arg("reason"), py::arg("detail") = "")
      .def("abort", &Scheduler::abort, py::arg("request_ids"))
      .def("take_finished", &Scheduler::take_finished)
      .def("cancel_step", &Scheduler::cancel_step)
      .def("preempt_all", &Scheduler::preempt_all)
      .def("release", &Scheduler::release, py::arg("request_id"))
      .def("output",
           [](const Scheduler& s, int64_t id, int32_t sample) {
             SampleOutput o = s.output(id, sample);
             py::dict d;
             d["token_ids"] = o.token_ids;
             d["position_ids"] = o.positions;
             d["branch_ids"] = o.branch_ids;
             std::vector<bool> inj(o.injected.begin(), o.injected.end());
             d["injected"] = inj;
             d["logprobs"] = o.logprobs;
             d["finish_reason"] = finish_name(o.finish);
             d["finish_detail"] = o.finish_detail;
             d["generated_tokens"] = o.generated_tokens;
             d["forks"] = o.forks;
             return d;
           },
           py::arg("request_id"), py::arg("sample"))
      .def("visible_tokens", &Scheduler::visible_tokens, py::arg("node"))
      .def("step_tokens", &Scheduler::step_tokens, py::arg("node"))
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("num_running", &Scheduler::num_running)
      .def("num_waiting", &Scheduler::num_waiting)
      .def("num_preemptions", &Scheduler::num_preemptions)
      .def("pool_stats",
           [](Scheduler& s) {
             py::dict d;
             d["total_blocks"] = s.pool().num_blocks();
             d["free_blocks"] = s.pool().num_free();
             d["used_blocks"] = s.pool().num_used();
             d["block_size"] = s.pool().block_size();
             return d;
           })
      .def("check_invariants", [](Scheduler& s) { s.pool().check_invariants(); });
}

}  // namespace npr

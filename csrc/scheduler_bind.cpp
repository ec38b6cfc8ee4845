// pybind11 binding of npr::Scheduler. Plans cross into Python as numpy arrays (torch.from_numpy
// wraps them without a copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include <torch/csrc/utils/pybind.h>

#include "bindings.h"
#include "scheduler.h"
#include "step_plan.h"

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
  py::class_<StepPlan>(m, "StepPlan",
                       "One engine step's plan (csrc/step_plan.h): `ints` (int32) and `slots` "
                       "(int64) go to the device in one copy each; the rest is host bookkeeping.")
      .def_readonly("ints", &StepPlan::ints)
      .def_readonly("slots", &StepPlan::slots)
      .def_property_readonly("sizes", [](const StepPlan& p) { return p.sizes; })
      .def_readonly("max_item_parts", &StepPlan::max_item_parts)
      .def_readonly("kv_tokens_read", &StepPlan::kv_tokens_read)
      .def_property_readonly("row_lens", [](const StepPlan& p) { return py::tuple(py::cast(p.row_lens)); })
      .def_property_readonly("row_node", [](const StepPlan& p) { return to_array(p.row_node); })
      .def_property_readonly("sample_request", [](const StepPlan& p) { return to_array(p.sample_request); })
      .def_property_readonly("sample_index", [](const StepPlan& p) { return to_array(p.sample_index); })
      .def_property_readonly("sample_node", [](const StepPlan& p) { return to_array(p.sample_node); })
      .def_property_readonly("sample_branch", [](const StepPlan& p) { return to_array(p.sample_branch); })
      .def_property_readonly("sample_in_step", [](const StepPlan& p) { return to_array(p.sample_in_step); })
      .def_property_readonly("sample_position", [](const StepPlan& p) { return to_array(p.sample_position); })
      .def_readonly("num_tokens", &StepPlan::num_tokens)
      .def_readonly("num_rows", &StepPlan::num_rows)
      .def_readonly("num_preempted", &StepPlan::num_preempted);
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
           [](Scheduler& s, int64_t kv_chunk, int64_t max_item_queries) {
             return make_step_plan(s.schedule(), s.config().block_size, s.config().num_blocks,
                                   kv_chunk, max_item_queries);
           },
           py::arg("kv_chunk") = 1024, py::arg("max_item_queries") = 64,
           "Plans the next step: a StepPlan (tree attention work items included). Raises "
           "ValueError if the attention planner rejects the step's tree; the step is then "
           "scheduled and cancel_step() undoes it.")
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

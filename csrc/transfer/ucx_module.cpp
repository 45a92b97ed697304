// pybind11 module thunderkv._ucx: the UCX data path (see ucx_rma.h). Built only when UCX is
// found at build time (THUNDERKV_UCX=AUTO|ON|OFF); thunderkv/transfer/ucx.py explains why not.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ucx_rma.h"

namespace py = pybind11;
using namespace tkv::ucx;

PYBIND11_MODULE(_ucx, m) {
  m.doc() = "UCX one-sided PUT between registered buffers (thunderkv.transfer's data path)";
  auto base = py::register_exception<TransferError>(m, "TransferError", PyExc_RuntimeError);
  py::register_exception<TransferTimeout>(m, "TransferTimeout", base.ptr());
  m.def("version", [] {
    unsigned a = 0, b = 0, c = 0;
    ucp_get_version(&a, &b, &c);
    return std::to_string(a) + "." + std::to_string(b) + "." + std::to_string(c);
  });

  py::class_<Worker, std::shared_ptr<Worker>>(m, "Worker")
      .def(py::init<bool>(), py::arg("error_handling") = false)
      .def("address", [](const Worker& w) { return py::bytes(w.address()); })
      .def("register_memory", &Worker::register_memory, py::arg("address"), py::arg("nbytes"))
      .def("connect", [](Worker& w, py::bytes addr) { return w.connect(std::string(addr)); },
           py::arg("remote_worker_address"))
      .def("start_progress_thread", &Worker::start_progress_thread)
      .def("stop_progress_thread", &Worker::stop_progress_thread,
           py::call_guard<py::gil_scoped_release>())
      .def("progress", &Worker::progress, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("error_handling", &Worker::error_handling);

  py::class_<Region, std::shared_ptr<Region>>(m, "Region")
      .def("packed_rkey", [](const Region& r) { return py::bytes(r.packed_rkey()); })
      .def_property_readonly("memory_type", &Region::memory_type)
      .def_property_readonly("address", &Region::address)
      .def_property_readonly("nbytes", &Region::nbytes)
      .def("release", &Region::release);

  py::class_<RemoteKey, std::shared_ptr<RemoteKey>>(m, "RemoteKey")
      .def_property_readonly("address", &RemoteKey::address)
      .def_property_readonly("nbytes", &RemoteKey::nbytes);

  py::class_<Endpoint, std::shared_ptr<Endpoint>>(m, "Endpoint")
      .def("unpack_rkey",
           [](Endpoint& e, py::bytes packed, uint64_t address, size_t nbytes) {
             return e.unpack_rkey(std::string(packed), address, nbytes);
           },
           py::arg("packed"), py::arg("address"), py::arg("nbytes"))
      .def("put", &Endpoint::put, py::arg("src"), py::arg("offset"), py::arg("nbytes"),
           py::arg("remote"), py::arg("remote_offset"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>(),
           "PUT + flush; seconds taken. Raises TransferTimeout / TransferError.")
      .def("transports", &Endpoint::transports)
      .def("describe", &Endpoint::describe)
      .def_property_readonly("failed", &Endpoint::failed)
      .def_property_readonly("error", &Endpoint::error)
      .def("close", &Endpoint::close, py::arg("force") = false, py::arg("timeout_s") = 1.0,
           py::call_guard<py::gil_scoped_release>());
}

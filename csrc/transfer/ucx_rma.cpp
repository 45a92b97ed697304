// See ucx_rma.h.
#include "ucx_rma.h"

#include <poll.h>
#include <sched.h>
#include <ucs/memory/memory_type.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>

namespace tkv::ucx {
namespace {

std::string status_text(ucs_status_t s) { return ucs_status_string(s); }

void check(ucs_status_t s, const char* what) {
  if (s != UCS_OK) throw TransferError(std::string(what) + ": " + status_text(s));
}

double now() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<Endpoint*>(arg)->mark_failed("peer failure reported by UCX: " + status_text(status));
}

}  // namespace

// ---------------------------------------------------------------- Worker
Worker::Worker(bool error_handling) : error_handling_(error_handling) {
  ucp_config_t* config = nullptr;
  check(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read");
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 1;
  ucs_status_t s = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  check(s, "ucp_init");
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_MULTI;
  s = ucp_worker_create(context_, &wp, &worker_);
  if (s != UCS_OK) {
    ucp_cleanup(context_);
    check(s, "ucp_worker_create");
  }
}

Worker::~Worker() {
  stop_progress_thread();
  if (worker_) ucp_worker_destroy(worker_);
  if (context_) ucp_cleanup(context_);
}

std::string Worker::address() const {
  ucp_address_t* addr = nullptr;
  size_t len = 0;
  check(ucp_worker_get_address(worker_, &addr, &len), "ucp_worker_get_address");
  std::string out(reinterpret_cast<const char*>(addr), len);
  ucp_worker_release_address(worker_, addr);
  return out;
}

std::shared_ptr<Region> Worker::register_memory(uintptr_t address, size_t nbytes) {
  return std::make_shared<Region>(shared_from_this(), address, nbytes);
}

std::shared_ptr<Endpoint> Worker::connect(const std::string& remote_worker_address) {
  return std::make_shared<Endpoint>(shared_from_this(), remote_worker_address);
}

unsigned Worker::progress() { return ucp_worker_progress(worker_); }

void Worker::sleep(double max_seconds) {
  if (efd_ < 0 && ucp_worker_get_efd(worker_, &efd_) != UCS_OK) {
    sched_yield();
    return;
  }
  if (ucp_worker_arm(worker_) != UCS_OK) return;  // UCS_ERR_BUSY: events pending, go progress
  pollfd pfd{efd_, POLLIN, 0};
  poll(&pfd, 1, static_cast<int>(max_seconds * 1000) + 1);
}

void Worker::start_progress_thread() {
  if (progress_thread_.joinable()) return;
  int efd = -1;
  check(ucp_worker_get_efd(worker_, &efd), "ucp_worker_get_efd");
  stop_ = false;
  progress_thread_ = std::thread([this, efd] {
    while (!stop_.load(std::memory_order_relaxed)) {
      if (ucp_worker_progress(worker_)) continue;
      ucs_status_t s = ucp_worker_arm(worker_);
      if (s == UCS_ERR_BUSY) continue;
      pollfd pfd{efd, POLLIN, 0};
      poll(&pfd, 1, 20);  // wake up at least every 20 ms to notice stop_
    }
  });
}

void Worker::stop_progress_thread() {
  if (!progress_thread_.joinable()) return;
  stop_ = true;
  ucp_worker_signal(worker_);
  progress_thread_.join();
}

std::string Worker::version() const {
  unsigned major = 0, minor = 0, release = 0;
  ucp_get_version(&major, &minor, &release);
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(release);
}

// ---------------------------------------------------------------- Region
Region::Region(std::shared_ptr<Worker> worker, uintptr_t address, size_t nbytes)
    : worker_(std::move(worker)), address_(address), nbytes_(nbytes) {
  if (nbytes == 0) return;  // nothing to map: a zero-byte region only ever moves zero bytes
  if (!address) throw std::invalid_argument("register_memory: null address");
  ucp_mem_map_params_t p{};
  p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  p.address = reinterpret_cast<void*>(address);
  p.length = nbytes;
  check(ucp_mem_map(worker_->context(), &p, &memh_), "ucp_mem_map");
}

Region::~Region() { release(); }

void Region::release() {
  if (memh_) ucp_mem_unmap(worker_->context(), memh_);
  memh_ = nullptr;
}

ucp_mem_h Region::handle() const {
  if (!memh_ && nbytes_) throw TransferError("region was released");
  return memh_;
}

std::string Region::packed_rkey() const {
  if (!nbytes_) return {};
  void* buf = nullptr;
  size_t len = 0;
  check(ucp_rkey_pack(worker_->context(), handle(), &buf, &len), "ucp_rkey_pack");
  std::string out(static_cast<const char*>(buf), len);
  ucp_rkey_buffer_release(buf);
  return out;
}

std::string Region::memory_type() const {
  if (!memh_) return "host";
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_MEM_TYPE;
  check(ucp_mem_query(memh_, &attr), "ucp_mem_query");
  return ucs_memory_type_names[attr.mem_type];
}

// ---------------------------------------------------------------- RemoteKey
RemoteKey::~RemoteKey() {
  if (rkey_) ucp_rkey_destroy(rkey_);
}

// ---------------------------------------------------------------- Endpoint
Endpoint::Endpoint(std::shared_ptr<Worker> worker, const std::string& remote_worker_address)
    : worker_(std::move(worker)) {
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  p.address = reinterpret_cast<const ucp_address_t*>(remote_worker_address.data());
  if (worker_->error_handling()) {
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.err_handler.cb = on_endpoint_error;
    p.err_handler.arg = this;
  } else {
    p.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  }
  check(ucp_ep_create(worker_->handle(), &p, &ep_), "ucp_ep_create");
}

Endpoint::~Endpoint() {
  try {
    close(worker_->error_handling(), 1.0);
  } catch (...) {
  }
}

void Endpoint::mark_failed(const std::string& why) {
  std::lock_guard<std::mutex> lock(error_mutex_);
  if (!failed_) error_ = why;
  failed_ = true;
}

std::string Endpoint::error() const {
  std::lock_guard<std::mutex> lock(error_mutex_);
  return error_;
}

std::shared_ptr<RemoteKey> Endpoint::unpack_rkey(const std::string& packed,
                                                 uint64_t remote_address, size_t remote_nbytes) {
  if (!ep_) throw TransferError("endpoint is closed");
  ucp_rkey_h rkey = nullptr;
  if (remote_nbytes) check(ucp_ep_rkey_unpack(ep_, packed.data(), &rkey), "ucp_ep_rkey_unpack");
  return std::make_shared<RemoteKey>(rkey, remote_address, remote_nbytes);
}

void Endpoint::wait(void* request, double deadline, const char* what) {
  if (request == nullptr) return;
  if (UCS_PTR_IS_ERR(request)) {
    mark_failed(std::string(what) + ": " + status_text(UCS_PTR_STATUS(request)));
    throw TransferError(error());
  }
  // Spin briefly (shared-memory PUTs finish in microseconds), then sleep on UCX's wake-up fd
  // so that a PUT crawling over a slow link does not burn a core the model needs.
  unsigned idle = 0;
  ucs_status_t s;
  while ((s = ucp_request_check_status(request)) == UCS_INPROGRESS) {
    if (worker_->progress()) {
      idle = 0;
      continue;
    }
    if (failed_) break;
    if (++idle < 256) continue;
    const double left = deadline - now();
    if (left <= 0) break;
    worker_->sleep(std::min(left, 0.005));
  }
  if (s == UCS_INPROGRESS) {
    // Not completed: the peer died or stalls. The request is freed by UCX when it completes
    // (or is cancelled by a force close); the endpoint is unusable from now on.
    ucp_request_free(request);
    if (!failed_) mark_failed(std::string(what) + " timed out");
    throw TransferTimeout(error());
  }
  ucp_request_free(request);
  if (s != UCS_OK) {
    mark_failed(std::string(what) + ": " + status_text(s));
    throw TransferError(error());
  }
}

double Endpoint::put(const Region& src, size_t offset, size_t nbytes, const RemoteKey& remote,
                     size_t remote_offset, double timeout_s) {
  if (!ep_) throw TransferError("endpoint is closed");
  if (failed_) throw TransferError("endpoint failed earlier: " + error());
  if (offset > src.nbytes() || nbytes > src.nbytes() - offset)
    throw std::out_of_range("put: source range outside the registered region");
  if (remote_offset > remote.nbytes() || nbytes > remote.nbytes() - remote_offset)
    throw std::out_of_range("put: destination range outside the peer's region");
  const double start = now();
  if (nbytes == 0) return 0.0;
  const double deadline = start + timeout_s;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_MEMH;
  p.memh = src.handle();
  void* req = ucp_put_nbx(ep_, reinterpret_cast<const void*>(src.address() + offset), nbytes,
                          remote.address() + remote_offset, remote.handle(), &p);
  wait(req, deadline, "put");
  ucp_request_param_t fp{};
  wait(ucp_ep_flush_nbx(ep_, &fp), deadline, "flush");
  return now() - start;
}

std::vector<std::pair<std::string, std::string>> Endpoint::transports() const {
  std::vector<std::pair<std::string, std::string>> out;
  if (!ep_) return out;
  ucp_transport_entry_t entries[32];
  ucp_ep_attr_t attr{};
  attr.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
  attr.transports.entries = entries;
  attr.transports.num_entries = 32;
  attr.transports.entry_size = sizeof(ucp_transport_entry_t);
  if (ucp_ep_query(ep_, &attr) != UCS_OK) return out;
  for (unsigned i = 0; i < attr.transports.num_entries; ++i)
    out.emplace_back(entries[i].transport_name ? entries[i].transport_name : "?",
                     entries[i].device_name ? entries[i].device_name : "?");
  return out;
}

std::string Endpoint::describe() const {
  if (!ep_) return {};
  char* text = nullptr;
  size_t len = 0;
  FILE* stream = open_memstream(&text, &len);
  if (!stream) return {};
  ucp_ep_print_info(ep_, stream);
  std::fclose(stream);
  std::string out(text, len);
  std::free(text);
  return out;
}

void Endpoint::close(bool force, double timeout_s) {
  if (!ep_) return;
  ucp_ep_h ep = ep_;
  ep_ = nullptr;
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = (force && worker_->error_handling()) ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  void* req = ucp_ep_close_nbx(ep, &p);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) return;
  const double deadline = now() + timeout_s;
  while (ucp_request_check_status(req) == UCS_INPROGRESS && now() < deadline)
    if (!worker_->progress()) sched_yield();
  ucp_request_free(req);
}

}  // namespace tkv::ucx

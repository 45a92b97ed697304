// The zero-copy data path of thunderkv.transfer: a thin C++ layer over UCX's libucp.
//
// A Worker owns one UCP context + worker (RMA + wakeup features, multi-thread mode). Memory is
// registered once (Region) and its remote key handed to peers over the side channel; the
// sender's Endpoint PUTs bytes from its own registered Region straight into the receiver's
// registered Region (one-sided, the receiver's CPU is not involved on shared-memory transports)
// and flushes, so that the completion notification it then sends on the side channel is only
// ever seen after the data is in place. Every wait has a deadline: a dead or stalled peer
// surfaces as TransferTimeout/TransferError, never a hang.
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace tkv::ucx {

struct TransferError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct TransferTimeout : TransferError {
  using TransferError::TransferError;
};

class Worker;

// A registered memory range. Stays mapped until release() or destruction.
class Region {
 public:
  Region(std::shared_ptr<Worker> worker, uintptr_t address, size_t nbytes);
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  std::string packed_rkey() const;  // what a peer needs to PUT into this region
  std::string memory_type() const;  // "host", "cuda", ...
  void release();
  uintptr_t address() const { return address_; }
  size_t nbytes() const { return nbytes_; }
  ucp_mem_h handle() const;

 private:
  std::shared_ptr<Worker> worker_;
  uintptr_t address_;
  size_t nbytes_;
  ucp_mem_h memh_ = nullptr;
};

// A peer's region, as seen through one endpoint.
class RemoteKey {
 public:
  RemoteKey(ucp_rkey_h rkey, uint64_t address, size_t nbytes)
      : rkey_(rkey), address_(address), nbytes_(nbytes) {}
  ~RemoteKey();
  RemoteKey(const RemoteKey&) = delete;
  RemoteKey& operator=(const RemoteKey&) = delete;
  ucp_rkey_h handle() const { return rkey_; }
  uint64_t address() const { return address_; }
  size_t nbytes() const { return nbytes_; }

 private:
  ucp_rkey_h rkey_;
  uint64_t address_;
  size_t nbytes_;
};

class Endpoint {
 public:
  Endpoint(std::shared_ptr<Worker> worker, const std::string& remote_worker_address);
  ~Endpoint();
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  std::shared_ptr<RemoteKey> unpack_rkey(const std::string& packed, uint64_t remote_address,
                                         size_t remote_nbytes);
  // PUT src[offset, offset + nbytes) to remote.address + remote_offset, then flush the endpoint.
  // Blocks (the caller releases the GIL) until done or timeout_s passes. Returns seconds.
  double put(const Region& src, size_t offset, size_t nbytes, const RemoteKey& remote,
             size_t remote_offset, double timeout_s);
  // (transport, device) of each lane, and UCX's own description of the lanes.
  std::vector<std::pair<std::string, std::string>> transports() const;
  std::string describe() const;
  bool failed() const { return failed_.load(); }
  std::string error() const;
  void close(bool force, double timeout_s);
  void mark_failed(const std::string& why);

 private:
  void wait(void* request, double deadline, const char* what);
  std::shared_ptr<Worker> worker_;
  ucp_ep_h ep_ = nullptr;
  std::atomic<bool> failed_{false};
  mutable std::mutex error_mutex_;
  std::string error_;
};

class Worker : public std::enable_shared_from_this<Worker> {
 public:
  // error_handling: UCP_ERR_HANDLING_MODE_PEER on endpoints (peer failures reported by UCX,
  // and force-close possible); it may restrict UCX's choice of transports.
  explicit Worker(bool error_handling);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  std::string address() const;
  std::shared_ptr<Region> register_memory(uintptr_t address, size_t nbytes);
  std::shared_ptr<Endpoint> connect(const std::string& remote_worker_address);
  // Progress on a background thread that sleeps on UCX's wake-up fd: the target of PUTs over
  // transports that need the target's CPU (tcp) makes progress without a Python loop.
  void start_progress_thread();
  void stop_progress_thread();
  unsigned progress();
  // Block until UCX has events (or max_seconds pass); for waits that are not busy-polling.
  void sleep(double max_seconds);
  bool error_handling() const { return error_handling_; }
  std::string version() const;

  ucp_context_h context() const { return context_; }
  ucp_worker_h handle() const { return worker_; }

 private:
  bool error_handling_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::thread progress_thread_;
  std::atomic<bool> stop_{false};
  int efd_ = -1;
};

}  // namespace tkv::ucx

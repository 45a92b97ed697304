// Make a device current for one call and give the caller's back afterwards.
//
// cudaSetDevice makes that device's primary context current on the calling thread, and torch's
// runtime works on the same thread-current context (even though this extension links its own
// cudart): leaving it switched would silently move the caller's later torch.empty(...,
// device="cuda") and torch.cuda.current_device() to our tensor's device.
//
// The Python callers enter torch's own device guard first (torch.cuda.device), so normally
// this finds the device current and does nothing. Used alone on a fresh thread, the restore
// would make device 0 current (cudaGetDevice reports 0 there), creating its primary context.
#pragma once

#include <cuda_runtime.h>

namespace tkv::cuda {

class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

  // Switch to `device` when it is not already current; the destructor switches back.
  cudaError_t set(int device) {
    int current = -1;
    cudaError_t e = cudaGetDevice(&current);
    if (e != cudaSuccess) return e;
    if (current == device) return cudaSuccess;
    e = cudaSetDevice(device);
    if (e == cudaSuccess) previous_ = current;
    return e;
  }

 private:
  int previous_ = -1;
};

}  // namespace tkv::cuda

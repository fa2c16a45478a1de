// JMM_HOST_DEVICE: a function of the plain C++ headers that host (g++) and device (nvcc) code
// both call.
#pragma once

#if defined(__CUDACC__)
#define JMM_HOST_DEVICE __host__ __device__
#else
#define JMM_HOST_DEVICE
#endif

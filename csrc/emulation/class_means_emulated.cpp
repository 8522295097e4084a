// The CUDA kernels of class_means, compiled as C++ for the CPU emulator (cuda_emulation.h).
#include "../cuda/class_means_cuda.cu"

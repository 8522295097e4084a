// The CUDA kernels of alpha_combine, compiled as C++ for the CPU emulator (cuda_emulation.h).
#include "../cuda/alpha_combine_cuda.cu"

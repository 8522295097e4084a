// The CUDA kernels of knn, compiled as C++ for the CPU emulator (cuda_emulation.h).
#include "../cuda/knn_cuda.cu"

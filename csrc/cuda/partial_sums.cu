// Final, fixed-order sums of the per-block partial column sums written by the
// backward kernels.

#include "cuda_utils.cuh"

namespace cofi::cuda {

namespace {

constexpr int kColsPerBlock = 32;
constexpr int kRowLanes = 16;

// Block (32 x 16): threadIdx.x picks a column, threadIdx.y a residue class of
// rows; the 16 class sums are added in a fixed order. blockIdx.y picks the output.
__global__ void sum_partials_kernel(const float* __restrict__ partials, int64_t n_rows, int64_t row_stride,
                                    PartialSums sums) {
  __shared__ float part[kRowLanes][kColsPerBlock];
  const int i = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const bool active = c < sums.cols[i];
  float total = 0.0f;
  if (active) {
    const float* p = partials + sums.offset[i] + c;
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < n_rows; r += kRowLanes) total += p[r * row_stride];
  }
  part[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y != 0 || !active) return;
#pragma unroll
  for (int y = 1; y < kRowLanes; ++y) total += part[y][threadIdx.x];
  if (sums.dtype[i] == 0) {
    static_cast<float*>(sums.out[i])[c] = total;
  } else if (sums.dtype[i] == 1) {
    static_cast<c10::Half*>(sums.out[i])[c] = static_cast<c10::Half>(total);
  } else {
    static_cast<c10::BFloat16*>(sums.out[i])[c] = static_cast<c10::BFloat16>(total);
  }
}

}  // namespace

void sum_partials(const float* partials, int64_t n_rows, int64_t row_stride, const PartialSums& sums) {
  if (sums.count == 0) return;
  int64_t widest = 0;
  for (int i = 0; i < sums.count; ++i) widest = std::max(widest, sums.cols[i]);
  if (widest == 0) return;
  const dim3 grid(static_cast<unsigned>((widest + kColsPerBlock - 1) / kColsPerBlock),
                  static_cast<unsigned>(sums.count));
  const dim3 block(kColsPerBlock, kRowLanes);
  sum_partials_kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(partials, n_rows, row_stride, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cofi::cuda

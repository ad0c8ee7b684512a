// Final, fixed-order sums of the per-block partial column sums written by the
// backward kernels.

#include "cuda_utils.cuh"

namespace cofi::cuda {

namespace {

// blockIdx.y picks the output.
__global__ void sum_partials_kernel(const float* __restrict__ partials, int64_t n_rows, int64_t row_stride,
                                    PartialSums sums) {
  const int i = blockIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= sums.cols[i]) return;
  const float* p = partials + sums.offset[i] + c;
  float total = 0.0f;
  for (int64_t r = 0; r < n_rows; ++r) total += p[r * row_stride];
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
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((widest + threads - 1) / threads), static_cast<unsigned>(sums.count));
  sum_partials_kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(partials, n_rows, row_stride, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cofi::cuda

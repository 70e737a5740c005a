// CUDA NMS: same result as rtmdet.ops.nms.nms_ref (and the CPU kernel in cpu/ops_cpu.cpp).
//
// Boxes are sorted by decreasing score (stable: ties keep the lower index first). A grid of
// 64 x 64 tiles writes, for every box i and every block of 64 later boxes, a 64-bit mask of
// the boxes that i suppresses (IoU > threshold, IoU = inter / union with eps 0, so 0/0 = NaN
// never suppresses). One block of threads then walks the boxes in order on the device,
// keeping a box unless an earlier kept box's mask removed it. No host copy of the mask.
#ifdef RTMDET_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace rtmdet {
namespace {

constexpr int kTile = 64;  // boxes per mask word
constexpr int kReduceThreads = 256;

template <typename T>
__device__ __forceinline__ T dmin(T a, T b) { return b < a ? b : a; }
template <typename T>
__device__ __forceinline__ T dmax(T a, T b) { return a < b ? b : a; }

template <typename T>
__device__ __forceinline__ bool iou_above(const T* a, const T* b, T thr) {
  T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  T w = dmax(dmin(a[2], b[2]) - dmax(a[0], b[0]), T(0));
  T h = dmax(dmin(a[3], b[3]) - dmax(a[1], b[1]), T(0));
  T inter = w * h;
  T uni = dmax(area_a + area_b - inter, T(0));
  return inter / uni > thr;  // NaN (0 / 0) compares false
}

// Block (x = column tile, y = row tile); thread t handles row box y * 64 + t.
template <typename scalar_t>
__global__ void nms_mask_kernel(int64_t M, int64_t tiles, at::opmath_type<scalar_t> thr,
                                const scalar_t* __restrict__ boxes, uint64_t* __restrict__ mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_tile = blockIdx.y, col_tile = blockIdx.x;
  if (col_tile < row_tile) return;  // only later boxes can be suppressed
  const int64_t rows_left = M - row_tile * kTile, cols_left = M - col_tile * kTile;
  const int rows = rows_left < kTile ? static_cast<int>(rows_left) : kTile;
  const int cols = cols_left < kTile ? static_cast<int>(cols_left) : kTile;
  __shared__ acc_t col_boxes[kTile * 4];
  if (threadIdx.x < cols) {
    const int64_t j = col_tile * kTile + threadIdx.x;
    for (int c = 0; c < 4; ++c) col_boxes[threadIdx.x * 4 + c] = static_cast<acc_t>(boxes[j * 4 + c]);
  }
  __syncthreads();
  if (threadIdx.x >= rows) return;
  const int64_t i = row_tile * kTile + threadIdx.x;
  acc_t box[4];
  for (int c = 0; c < 4; ++c) box[c] = static_cast<acc_t>(boxes[i * 4 + c]);
  uint64_t bits = 0;
  const int start = (row_tile == col_tile) ? threadIdx.x + 1 : 0;
  for (int j = start; j < cols; ++j) {
    if (iou_above(box, col_boxes + j * 4, thr)) bits |= uint64_t(1) << j;
  }
  mask[i * tiles + col_tile] = bits;
}

// One block: walk the sorted boxes in order; `removed` (shared) holds the suppressed bits.
__global__ void nms_reduce_kernel(int64_t M, int64_t tiles, const uint64_t* __restrict__ mask,
                                  uint8_t* __restrict__ keep) {
  extern __shared__ uint64_t removed[];
  for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) removed[t] = 0;
  __syncthreads();
  for (int64_t i = 0; i < M; ++i) {
    const int64_t tile = i / kTile;
    const bool kept = !((removed[tile] >> (i % kTile)) & 1);
    __syncthreads();  // every thread has read removed[tile] before anyone updates it
    if (kept) {
      const uint64_t* row = mask + i * tiles;
      for (int64_t t = tile + threadIdx.x; t < tiles; t += blockDim.x) removed[t] |= row[t];
    }
    if (threadIdx.x == 0) keep[i] = kept;
    __syncthreads();
  }
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(boxes.is_cuda() && scores.is_cuda(), "nms (CUDA): boxes and scores must be CUDA tensors");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "nms: boxes must be (M, 4) xyxy boxes, got shape ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "nms: boxes must be floating point, got ",
              boxes.scalar_type());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "nms: scores must be (M,) = (",
              boxes.size(0), ",), got ", scores.sizes());
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t M = boxes.size(0);
  if (M == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  at::Tensor sorted = boxes.index_select(0, order).contiguous();
  const int64_t tiles = (M + kTile - 1) / kTile;
  const size_t shared = static_cast<size_t>(tiles) * sizeof(uint64_t);
  TORCH_CHECK(shared <= 48 * 1024, "nms (CUDA): at most ", 48 * 1024 / 8 * kTile,
              " boxes per call, got ", M, "; keep the top-scoring boxes first");
  TORCH_CHECK(tiles <= 65535, "nms (CUDA): too many boxes");
  at::Tensor mask = at::empty({M, tiles}, boxes.options().dtype(at::kLong));
  at::Tensor keep = at::empty({M}, boxes.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sorted.scalar_type(), "nms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
    nms_mask_kernel<scalar_t><<<grid, kTile, 0, stream>>>(
        M, tiles, static_cast<acc_t>(iou_threshold), sorted.data_ptr<scalar_t>(),
        reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  nms_reduce_kernel<<<1, kReduceThreads, shared, stream>>>(
      M, tiles, reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()), keep.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order.masked_select(keep.to(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(rtmdet, CUDA, m) { m.impl("nms", &nms_cuda); }

}  // namespace rtmdet

#endif  // RTMDET_WITH_CUDA

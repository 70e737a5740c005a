// Dynamic Soft Label Assigner on the CPU (SPEC section 2), same result as dsla.dsl_assign_ref.
//
// Per image, never a dense (N, G) matrix:
//   pass 1 (parallel over prior chunks): valid[n] and, for mmdet, S0[n] = sum_c f(x[n,c], 0);
//   pass 2 (parallel over (image, gt)): the gt's top-`topk` IoUs (dynamic k) and its `topk`
//     lowest-cost valid priors, kept in a small sorted array of (cost key, prior index);
//   pass 3 (parallel over images): count the selections per prior; a prior chosen by two or
//     more gts recomputes its row over the real gts and takes the cheapest (lower gt on ties).
// Pass 2 computes the full cost only for priors whose centre term can still beat the current
// topk-th best (the centre cost 10^(d - r) grows fast with the distance d in strides), seeded
// with the costs of the topk priors nearest to the gt centre; the pruning is exact.
// Extra memory: O(B*N + B*G*topk).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "common.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector types in inline helpers

namespace rtmdet {
namespace {

constexpr float kEps = 1e-7f;
constexpr float kIouEps = 1e-6f;

// ---- one row of logits in any float dtype -------------------------------------------------
struct Logits {
  const void* data;
  at::ScalarType dtype;
  int64_t C;

  float at(int64_t row, int64_t c) const {
    int64_t i = row * C + c;
    switch (dtype) {
      case at::kFloat: return static_cast<const float*>(data)[i];
      case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
      case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
      default: return static_cast<float>(static_cast<const double*>(data)[i]);
    }
  }
  // Pointer to row `row` as float32, converting into `buf` (size C) when needed.
  const float* row_f32(int64_t row, float* buf) const {
    if (dtype == at::kFloat) return static_cast<const float*>(data) + row * C;
    for (int64_t c = 0; c < C; ++c) buf[c] = at(row, c);
    return buf;
  }
};

// ---- S0[n] = sum_c f(x_c, 0), f(x, 0) = softplus(x) * sigmoid(x)^2 -----------------------
// Eight lanes at a time with GCC vector types (AVX2 clone where the CPU has it) and Cephes
// exp / log1p polynomials (~1 ulp): S0's summation order differs from torch's reduction
// anyway, so last-bit agreement with the reference is not possible here; 1e-6 relative is.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline f8 splat(float v) { return f8{v, v, v, v, v, v, v, v}; }

__attribute__((always_inline)) inline f8 exp_nonpos(f8 x) {  // exp(x) for x <= 0
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  f8 kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  f8 r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  f8 y = p * r * r + r + 1.0f;
  i8 bits = (__builtin_convertvector(kf, i8) + 127) << 23;
  return y * reinterpret_cast<f8&>(bits);
}

__attribute__((always_inline)) inline f8 log1p_unit(f8 t) {  // log1p(t) for t in [0, 1]
  f8 u = t + 1.0f;
  i8 big = u > splat(1.41421356f);
  f8 m = big ? u * 0.5f : u;
  f8 e = big ? splat(1.0f) : splat(0.0f);
  f8 z = m - 1.0f;
  f8 z2 = z * z;
  f8 p = splat(7.0376836292e-2f);
  p = p * z - 1.1514610310e-1f;
  p = p * z + 1.1676998740e-1f;
  p = p * z - 1.2420140846e-1f;
  p = p * z + 1.4249322787e-1f;
  p = p * z - 1.6668057665e-1f;
  p = p * z + 2.0000714765e-1f;
  p = p * z - 2.4999993993e-1f;
  p = p * z + 3.3333331174e-1f;
  f8 y = z * z2 * p;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z2;
  f8 res = z + y + e * 0.693359375f;
  return res + (t - (u - 1.0f)) / u;  // the rounding of 1 + t
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
float s0_row(const float* x, int64_t C) {
  f8 acc = splat(0.0f);
  for (int64_t c0 = 0; c0 < C; c0 += 8) {
    f8 v = splat(-100.0f);  // padding lanes: f(-100, 0) underflows to exactly 0
    std::memcpy(&v, x + c0, 4 * std::min<int64_t>(8, C - c0));
    f8 t = exp_nonpos(v < 0.0f ? v : -v);
    f8 softplus = (v > 0.0f ? v : splat(0.0f)) + log1p_unit(t);
    f8 s = (v >= 0.0f ? splat(1.0f) : t) / (t + 1.0f);
    acc += softplus * (s * s);
  }
  float total = 0.0f;
  for (int i = 0; i < 8; ++i) total += acc[i];
  return total;
}

// ---- per-pair terms, in the reference's float order ----------------------------------------
struct Image {
  const float* priors;  // (N, 4)
  const float* pred;    // (N, 4) this image
  Logits logits;        // rows b*N + n
  int64_t row0;         // b * N
  const float* gt;      // (G, 4) this image
  const int64_t* labels;
  const bool* mask;
  const uint8_t* valid;
  const float* s0;
  int64_t N, G;
  const float* pred_soa;   // (4, N) this image: x1, y1, x2, y2
  const float* prior_soa;  // (3, N): x, y, stride_w^2
};

struct Params {
  int64_t topk;
  float radius, iou_weight;
  bool mmyolo;
};

// f(x, y) = BCEWithLogits(x, y) * (y - sigmoid(x))^2
inline float soft_cost(float x, float y, float logsig, float sig) {
  float d = y - sig;
  return bce_logits(x, y, logsig) * (d * d);
}

inline float center_exponent(const float* prior, const float* g, float radius) {
  float dx = prior[0] - (g[0] + g[2]) / 2.0f;
  float dy = prior[1] - (g[1] + g[3]) / 2.0f;
  return std::sqrt(dx * dx + dy * dy) / prior[2] - radius;
}

inline float pair_cost(const Image& im, const Params& p, int64_t n, int64_t g, float iou) {
  const float* gb = im.gt + 4 * g;
  float center = std::pow(10.0f, center_exponent(im.priors + 4 * n, gb, p.radius));
  float iou_cost = -std::log(iou + kEps) * p.iou_weight;
  int64_t C = im.logits.C;
  int64_t label = std::min(std::max<int64_t>(im.labels[g], 0), C - 1);
  float x = im.logits.at(im.row0 + n, label);
  float ls = log_sigmoid(x), sg = sigmoid(x);
  float cls = soft_cost(x, iou, ls, sg);
  if (!p.mmyolo) cls = (im.s0[n] - soft_cost(x, 0.0f, ls, sg)) + cls;
  return cls + iou_cost + center;
}

// A small array sorted ascending by (key, index); keeps the `cap` smallest.
struct TopSmall {
  uint64_t* items;  // (key << 32) | index: one integer compare gives (key, index) order
  int64_t size = 0, cap;
  TopSmall(uint64_t* buf, int64_t cap) : items(buf), cap(cap) {}
  bool full() const { return size == cap; }
  void push(uint64_t item) {
    if (full() && item >= items[size - 1]) return;
    int64_t i = full() ? size - 1 : size++;
    for (; i > 0 && items[i - 1] > item; --i) items[i] = items[i - 1];
    items[i] = item;
  }
};

// ---- pass 1 helper: inside[n] |= prior n strictly inside gt gb, eight priors at a time ----------
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void mark_inside(const float* prior_soa, int64_t N, int64_t n0, int64_t n1, const float* gb, uint8_t* inside) {
  const f8 b0 = splat(gb[0]), b1 = splat(gb[1]), b2 = splat(gb[2]), b3 = splat(gb[3]);
  auto vmin = [](f8 a, f8 b) { return b < a ? b : a; };
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t m = std::min<int64_t>(8, n1 - n);
    f8 px = splat(0.0f), py = splat(0.0f);
    std::memcpy(&px, prior_soa + n, 4 * m);
    std::memcpy(&py, prior_soa + N + n, 4 * m);
    i8 in = vmin(vmin(px - b0, py - b1), vmin(b2 - px, b3 - py)) > 0.0f;
    for (int64_t i = 0; i < m; ++i) inside[n + i] |= in[i] != 0;
  }
}

// ---- pass 2: one gt's dynamic k and selected priors ----------------------------------------
// IoU of every prediction with gt `gb` (same float operations as box_iou_pair) and the squared
// distance of every prior to the gt centre in strides, eight priors at a time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void iou_d2_all(const float* pred_soa, const float* prior_soa, int64_t N, const float* gb, float* iou,
                float* d2) {
  const f8 b0 = splat(gb[0]), b1 = splat(gb[1]), b2 = splat(gb[2]), b3 = splat(gb[3]);
  const f8 area_b = (b2 - b0) * (b3 - b1);
  const f8 cx = (b0 + b2) / 2.0f, cy = (b1 + b3) / 2.0f, zero = splat(0.0f);
  auto vmin = [](f8 a, f8 b) { return b < a ? b : a; };  // std::min
  auto vmax = [](f8 a, f8 b) { return a < b ? b : a; };  // std::max
  for (int64_t n = 0; n < N; n += 8) {
    const int64_t m = std::min<int64_t>(8, N - n);
    f8 a0 = zero, a1 = zero, a2 = zero, a3 = zero, px = zero, py = zero, s2 = splat(1.0f);
    std::memcpy(&a0, pred_soa + n, 4 * m);
    std::memcpy(&a1, pred_soa + N + n, 4 * m);
    std::memcpy(&a2, pred_soa + 2 * N + n, 4 * m);
    std::memcpy(&a3, pred_soa + 3 * N + n, 4 * m);
    std::memcpy(&px, prior_soa + n, 4 * m);
    std::memcpy(&py, prior_soa + N + n, 4 * m);
    std::memcpy(&s2, prior_soa + 2 * N + n, 4 * m);
    f8 area_a = (a2 - a0) * (a3 - a1);
    f8 w = vmax(vmin(a2, b2) - vmax(a0, b0), zero);
    f8 h = vmax(vmin(a3, b3) - vmax(a1, b1), zero);
    f8 inter = w * h;
    f8 uni = vmax(area_a + area_b - inter, splat(kIouEps));
    f8 r = inter / uni;
    f8 dx = px - cx, dy = py - cy;
    f8 e2 = (dx * dx + dy * dy) / s2;
    std::memcpy(iou + n, &r, 4 * m);
    std::memcpy(d2 + n, &e2, 4 * m);
  }
}

// Writes the gt's selected priors (best first) to out_idx; returns how many. `ious` and `d2`
// are scratch of N floats: every IoU with the gt, every squared centre distance in strides.
int64_t select_for_gt(const Image& im, const Params& p, int64_t g, int64_t* out_idx, float* ious, float* d2) {
  const int64_t N = im.N, K = p.topk;
  const float* gb = im.gt + 4 * g;
  float top_iou[64];  // descending; K <= 64 here, larger K takes the general path below
  std::vector<float> top_big;
  float* top = K <= 64 ? top_iou : (top_big.resize(K), top_big.data());
  int64_t ntop = 0;
  uint64_t near_buf[64];
  std::vector<uint64_t> near_big;
  TopSmall near(K <= 64 ? near_buf : (near_big.resize(K), near_big.data()), K);
  float near_worst = std::numeric_limits<float>::infinity();
  iou_d2_all(im.pred_soa, im.prior_soa, N, gb, ious, d2);
  // Scan eight priors at a time; a block is skipped when no prior can enter either list
  // under the thresholds at its start (they only tighten, so skipping is exact).
  for (int64_t n0 = 0; n0 < N; n0 += 8) {
    const int64_t n1 = std::min(N, n0 + 8);
    const float iou_thr = ntop < K ? -1.0f : top[ntop - 1];
    const float d2_thr = near.full() ? near_worst : std::numeric_limits<float>::infinity();
    bool any = false;
    for (int64_t n = n0; n < n1; ++n) {
      bool v = im.valid[n];
      any |= ((v || p.mmyolo) && ious[n] > iou_thr) || (v && !(d2[n] >= d2_thr));
    }
    if (!any) continue;
    for (int64_t n = n0; n < n1; ++n) {
      bool v = im.valid[n];
      if (!v && !p.mmyolo) continue;  // mmdet: dynamic k over valid priors; mmyolo: over all
      float iou = ious[n];
      if (ntop < K || iou > top[ntop - 1]) {
        int64_t i = ntop < K ? ntop++ : ntop - 1;
        for (; i > 0 && top[i - 1] < iou; --i) top[i] = top[i - 1];
        top[i] = iou;
      }
      if (!v) continue;
      float e2 = d2[n];
      if (e2 < near_worst || !near.full()) {
        near.push(((uint64_t)ordered_key(e2) << 32) | (uint64_t)n);
        if (near.full()) near_worst = d2[near.items[K - 1] & 0xffffffffu];
      }
    }
  }
  float total = 0.0f;
  for (int64_t i = 0; i < ntop; ++i) total += top[i];  // descending order, as the reference
  int64_t k = std::max<int64_t>(static_cast<int64_t>(total), 1);
  k = std::min(k, K);
  if (near.size == 0) return 0;

  // Bound on the K-th best cost from the K priors nearest the centre, then an exact pruned
  // scan: cost >= centre - 1 whenever 0 <= iou_weight <= 1e5 (the other terms are >= -tiny),
  // so a prior with 10^e > bound + 1 cannot enter the K best. With fewer than K valid
  // priors every valid prior is a candidate anyway.
  float bound = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < near.size; ++i) {
    int64_t n = (int64_t)(near.items[i] & 0xffffffffu);
    float iou = ious[n];
    bound = std::max(bound, pair_cost(im, p, n, g, iou));
  }
  float max_d2 = std::numeric_limits<float>::infinity();
  if (near.full() && p.iou_weight >= 0.0f && p.iou_weight <= 1e5f && std::isfinite(bound)) {
    float max_e = std::log10(std::max(bound, 0.0f) + 1.0f) + 1e-3f;  // e = d - r beyond this: out
    float d = std::max(max_e + p.radius, 0.0f);
    max_d2 = d * d * 1.0001f + 1e-6f;  // margin for the rounding of sqrt and the division
  }
  uint64_t cand_buf[64];
  std::vector<uint64_t> cand_big;
  TopSmall cand(K <= 64 ? cand_buf : (cand_big.resize(K), cand_big.data()), K);
  for (int64_t n = 0; n < N; ++n) {
    if (!im.valid[n] || d2[n] > max_d2) continue;
    cand.push(((uint64_t)ordered_key(pair_cost(im, p, n, g, ious[n])) << 32) | (uint64_t)n);
  }
  int64_t take = std::min(k, cand.size);
  for (int64_t i = 0; i < take; ++i) out_idx[i] = (int64_t)(cand.items[i] & 0xffffffffu);
  return take;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dsl_assign_cpu(
    const at::Tensor& priors_in, const at::Tensor& pred_in, const at::Tensor& logits_in,
    const at::Tensor& gt_in, const at::Tensor& labels_in, const at::Tensor& mask_in, int64_t topk,
    double soft_center_radius, double iou_weight, bool mmyolo) {
  TORCH_CHECK(priors_in.dim() == 2 && priors_in.size(1) == 4, "dsl_assign: priors must be (N, 4), got ",
              priors_in.sizes());
  TORCH_CHECK(pred_in.dim() == 3 && pred_in.size(2) == 4, "dsl_assign: pred_bboxes must be (B, N, 4), got ",
              pred_in.sizes());
  const int64_t B = pred_in.size(0), N = pred_in.size(1);
  TORCH_CHECK(priors_in.size(0) == N, "dsl_assign: priors has ", priors_in.size(0),
              " rows but pred_bboxes has N = ", N);
  TORCH_CHECK(logits_in.dim() == 3 && logits_in.size(0) == B && logits_in.size(1) == N,
              "dsl_assign: pred_logits must be (B, N, C) = (", B, ", ", N, ", C), got ", logits_in.sizes());
  TORCH_CHECK(gt_in.dim() == 3 && gt_in.size(0) == B && gt_in.size(2) == 4,
              "dsl_assign: gt_bboxes must be (B, G, 4), got ", gt_in.sizes());
  const int64_t G = gt_in.size(1), C = logits_in.size(2);
  TORCH_CHECK(labels_in.dim() == 2 && labels_in.size(0) == B && labels_in.size(1) == G,
              "dsl_assign: gt_labels must be (B, G) = (", B, ", ", G, "), got ", labels_in.sizes());
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == B && mask_in.size(1) == G &&
                  mask_in.scalar_type() == at::kBool,
              "dsl_assign: gt_mask must be a bool (B, G) tensor, got ", mask_in.sizes(), " ",
              mask_in.scalar_type());
  TORCH_CHECK(topk >= 1, "dsl_assign: topk must be >= 1, got ", topk);
  TORCH_CHECK(N < (int64_t(1) << 32), "dsl_assign: too many priors");
  TORCH_CHECK(G == 0 || C > 0, "dsl_assign: pred_logits needs at least one class");
  auto st = logits_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "dsl_assign: pred_logits must be float32, float16, bfloat16 or float64, got ", st);

  auto long_opts = pred_in.options().dtype(at::kLong);
  at::Tensor gt_index = at::full({B, N}, -1, long_opts);
  at::Tensor labels_out = at::full({B, N}, -1, long_opts);
  at::Tensor ious_out = at::zeros({B, N}, pred_in.options().dtype(at::kFloat));
  if (B == 0 || N == 0 || G == 0) return {gt_index, labels_out, ious_out};

  at::Tensor priors = priors_in.to(at::kFloat).contiguous();
  at::Tensor pred = pred_in.to(at::kFloat).contiguous();
  at::Tensor logits = logits_in.contiguous();
  at::Tensor gts = gt_in.to(at::kFloat).contiguous();
  at::Tensor labels = labels_in.to(at::kLong).contiguous();
  at::Tensor mask = mask_in.contiguous();
  at::Tensor valid = at::empty({B, N}, pred.options().dtype(at::kByte));
  at::Tensor s0 = at::empty({mmyolo ? 0 : B, N}, pred.options());
  // Structure-of-arrays copies for the vectorised IoU / distance loop of pass 2.
  at::Tensor pred_soa = pred.permute({0, 2, 1}).contiguous();  // (B, 4, N)
  at::Tensor prior_soa = at::stack({priors.select(1, 0), priors.select(1, 1),
                                    priors.select(1, 2) * priors.select(1, 2)}).contiguous();
  const int64_t K = std::min(topk, N);
  std::vector<int64_t> sel_idx(B * G * K), sel_cnt(B * G, 0);

  Params p{K, static_cast<float>(soft_center_radius), static_cast<float>(iou_weight), mmyolo};
  Logits lg{logits.data_ptr(), st, C};
  auto image = [&](int64_t b) {
    return Image{priors.data_ptr<float>(), pred.data_ptr<float>() + b * N * 4, lg, b * N,
                 gts.data_ptr<float>() + b * G * 4, labels.data_ptr<int64_t>() + b * G,
                 mask.data_ptr<bool>() + b * G, valid.data_ptr<uint8_t>() + b * N,
                 mmyolo ? nullptr : s0.data_ptr<float>() + b * N, N, G,
                 pred_soa.data_ptr<float>() + b * 4 * N, prior_soa.data_ptr<float>()};
  };

  // Pass 1: valid priors and S0, over (image, prior chunk).
  const int64_t chunk = 256, chunks = (N + chunk - 1) / chunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(C);
    for (int64_t t = lo; t < hi; ++t) {
      int64_t b = t / chunks, n0 = (t % chunks) * chunk, n1 = std::min(N, n0 + chunk);
      Image im = image(b);
      uint8_t* v = valid.data_ptr<uint8_t>() + b * N;
      std::fill(v + n0, v + n1, uint8_t(0));
      for (int64_t g = 0; g < G; ++g)
        if (im.mask[g]) mark_inside(im.prior_soa, N, n0, n1, im.gt + 4 * g, v);
      if (mmyolo) continue;
      for (int64_t n = n0; n < n1; ++n)
        if (v[n]) s0.data_ptr<float>()[b * N + n] = s0_row(lg.row_f32(b * N + n, buf.data()), C);
    }
  });

  // Pass 2: each real gt's selection, over (image, gt).
  at::parallel_for(0, B * G, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> d2(N), ious(N);
    for (int64_t t = lo; t < hi; ++t) {
      int64_t b = t / G, g = t % G;
      Image im = image(b);
      if (!im.mask[g]) continue;
      sel_cnt[t] = select_for_gt(im, p, g, sel_idx.data() + t * K, ious.data(), d2.data());
    }
  });

  // Pass 3: resolve priors chosen by several gts, then write the outputs, over images.
  at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
    std::vector<int32_t> count(N);
    std::vector<int64_t> touched;
    for (int64_t b = lo; b < hi; ++b) {
      Image im = image(b);
      int64_t* gi = gt_index.data_ptr<int64_t>() + b * N;
      int64_t* lb = labels_out.data_ptr<int64_t>() + b * N;
      float* io = ious_out.data_ptr<float>() + b * N;
      touched.clear();
      for (int64_t g = 0; g < G; ++g) {
        const int64_t* idx = sel_idx.data() + (b * G + g) * K;
        for (int64_t i = 0; i < sel_cnt[b * G + g]; ++i) {
          int64_t n = idx[i];
          if (count[n]++ == 0) {
            gi[n] = g;  // the only gt, unless another one also picks n
            touched.push_back(n);
          }
        }
      }
      for (int64_t n : touched) {
        if (count[n] > 1) {
          uint32_t best_key = 0;
          int64_t best = -1;
          for (int64_t g = 0; g < G; ++g) {
            if (!im.mask[g]) continue;
            float iou = box_iou_pair(im.pred + 4 * n, im.gt + 4 * g, false, kIouEps);
            uint32_t key = ordered_key(pair_cost(im, p, n, g, iou));
            if (best < 0 || key < best_key) best = g, best_key = key;
          }
          gi[n] = best;
        }
        count[n] = 0;
        int64_t g = gi[n];
        lb[n] = im.labels[g];
        io[n] = box_iou_pair(im.pred + 4 * n, im.gt + 4 * g, false, kIouEps);
      }
    }
  });
  return {gt_index, labels_out, ious_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtmdet, CPU, m) { m.impl("dsl_assign", &dsl_assign_cpu); }

}  // namespace rtmdet

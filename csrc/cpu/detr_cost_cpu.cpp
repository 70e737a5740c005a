// DETR match cost on the CPU (SPEC section 4): torch.ops.rtmdet.detr_match_cost.
//
// detr_match_cost(pred_logits (B, Q, K) fp32/fp16/bf16/fp64, pred_boxes (B, Q, 4) xyxy,
//                 gt_boxes (B, G, 4) xyxy, gt_labels (B, G) int, image_sizes (B, 2) (h, w),
//                 gt_mask (B, G) bool or None (= all real), cls_cost "softmax" | "focal",
//                 cls_weight, l1_weight, giou_weight, focal_alpha, focal_gamma, eps)
//   -> cost (B, Q, G) float32, cost = (cls_weight * cls + l1_weight * L1) - giou_weight * GIoU
//
// The maths of rtmdet.ops.detr_match_cost_ref (and kernels/detr_cost.py), in float32 with its
// operation order (setup.py's -ffp-contract=off keeps a*b+c unfused), so the two differ only
// where libm's expf/logf and PyTorch's vectorised ones round differently (1 ulp), plus the
// order of the softmax sum (here a double accumulation, rounded once).
//   softmax: cls = -(exp(x[L] - m) * (1 / s)), m = max_k x[k], s = sum_k exp(x[k] - m);
//   focal:   cls = pos - neg at p = 1 / (1 + exp(-x[L])), as mmdet's FocalLossCost;
//   L1 of the (cx, cy, w, h) / (w, h, w, h) boxes; GIoU with union and enclose clamped at 1e-6.
// Padded gts (mask False) are read as the reference reads them, a zero box with label 0, and
// real labels are clamped to [0, K): no read out of bounds whatever the padding holds.
//
// Layout, instead of the reference's (B, Q, G) and (B, Q, K) intermediates:
//   per image: the gts as structure-of-arrays (box, area, normalised cxcywh) and the distinct
//     labels among them (at most min(G, K)), each gt holding the slot of its label;
//   one task of at::parallel_for = a block of queries of one image; per query, the logits row
//     is read once (softmax: its max and exp-sum; focal: only the labels' columns), the
//     weighted class cost of each distinct label is computed once, then the (G,) output row
//     is written: the class costs gathered by slot, then the box terms in a branch-free loop
//     over the gts that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

namespace rtmdet {
namespace {

constexpr float kGiouEps = 1e-6f;  // mmdet's bbox_overlaps eps (SPEC section 1)
constexpr int64_t kBlockQ = 32;    // queries per task

struct Params {
  bool focal;
  float cls_w, l1_w, giou_w;
  float alpha, one_minus_alpha;  // rounded from doubles, as PyTorch rounds Python scalars
  double gamma;
  float eps;
};

// base^gamma for base in [0, 1] as torch.pow(tensor, gamma) rounds it: PyTorch's special
// exponents exactly, others as a double pow rounded once (PyTorch's Sleef powf: <= 1 ulp).
inline float pow_gamma(float base, double gamma) {
  if (gamma == 0.0) return 1.0f;  // pow(0, 0) = 1
  if (gamma == 1.0) return base;
  if (gamma == 0.5) return std::sqrt(base);
  if (gamma == 2.0) return base * base;
  if (gamma == 3.0) return base * base * base;
  return static_cast<float>(std::pow(static_cast<double>(base), gamma));
}

// pos - neg of mmdet's FocalLossCost at logit x, with the reference's roundings. p rounds as
// PyTorch's sigmoid (the division is exact, exp within an ulp): that matters because
// log(1 - p + eps) is ill-conditioned where p is within a few ulps of 1.
inline float focal_cost(float x, const Params& P) {
  const float p = 1.0f / (1.0f + std::exp(-x));
  const float q = 1.0f - p;
  const float neg = -std::log(q + P.eps) * P.one_minus_alpha * pow_gamma(p, P.gamma);
  const float pos = -std::log(p + P.eps) * P.alpha * pow_gamma(q, P.gamma);
  return pos - neg;
}

// One image's gts, structure-of-arrays (padded gts: the zero box).
struct Gts {
  const float *x1, *y1, *x2, *y2, *area, *cx, *cy, *w, *h;
};

// out[g] = (out[g] + l1_w * L1(q, g)) - giou_w * GIoU(q, g) over one query's row; out holds the
// weighted class cost on entry. The reference's float operations in its order (geometry._iou,
// cdist's ((a + b) + c) + d), no branches, so that it vectorises.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx2", "default")))
#endif
void box_terms(float* __restrict out, int64_t G, const Gts& t, const float* pb, float area_p,
               const float* pn, float l1_w, float giou_w) {
  const float px1 = pb[0], py1 = pb[1], px2 = pb[2], py2 = pb[3];
  const float pcx = pn[0], pcy = pn[1], pw = pn[2], ph = pn[3];
  const float* __restrict gx1 = t.x1;
  const float* __restrict gy1 = t.y1;
  const float* __restrict gx2 = t.x2;
  const float* __restrict gy2 = t.y2;
  const float* __restrict garea = t.area;
  const float* __restrict gcx = t.cx;
  const float* __restrict gcy = t.cy;
  const float* __restrict gw = t.w;
  const float* __restrict gh = t.h;
  for (int64_t g = 0; g < G; ++g) {
    const float l1 = ((std::fabs(pcx - gcx[g]) + std::fabs(pcy - gcy[g])) + std::fabs(pw - gw[g])) +
                     std::fabs(ph - gh[g]);
    const float iw = std::max(std::min(px2, gx2[g]) - std::max(px1, gx1[g]), 0.0f);
    const float ih = std::max(std::min(py2, gy2[g]) - std::max(py1, gy1[g]), 0.0f);
    const float inter = iw * ih;
    const float uni = std::max((area_p + garea[g]) - inter, kGiouEps);
    const float ew = std::max(std::max(px2, gx2[g]) - std::min(px1, gx1[g]), 0.0f);
    const float eh = std::max(std::max(py2, gy2[g]) - std::min(py1, gy1[g]), 0.0f);
    const float encl = std::max(ew * eh, kGiouEps);
    const float giou = inter / uni - (encl - uni) / encl;
    out[g] = (out[g] + l1 * l1_w) - giou * giou_w;
  }
}

// (cx, cy, w, h) / (img_w, img_h, img_w, img_h) of an xyxy box, as the reference's _cxcywh / factor.
inline void normalise(const float* b, float img_h, float img_w, float* n) {
  n[0] = ((b[0] + b[2]) / 2.0f) / img_w;
  n[1] = ((b[1] + b[3]) / 2.0f) / img_h;
  n[2] = (b[2] - b[0]) / img_w;
  n[3] = (b[3] - b[1]) / img_h;
}

template <typename scalar_t>
void compute(const scalar_t* logits, int64_t s_lb, int64_t s_lq, int64_t s_lk, const float* pred,
             const float* sizes, const std::vector<float>& soa, const std::vector<int32_t>& slot,
             const std::vector<int32_t>& labels_of, const std::vector<int64_t>& n_labels, int64_t B,
             int64_t Q, int64_t G, int64_t K, const Params& P, float* out) {
  const int64_t blocks = (Q + kBlockQ - 1) / kBlockQ;
  // Small problems run inline: waking the thread pool costs more than computing them.
  const int64_t work = kBlockQ * (G * 24 + (P.focal ? 0 : K) * 4) + 1;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work);
  at::parallel_for(0, B * blocks, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> cls(std::min(G, K) + 1);  // weighted class cost per distinct label
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / blocks;
      const int64_t q0 = (task % blocks) * kBlockQ, q1 = std::min(Q, q0 + kBlockQ);
      const float img_h = sizes[2 * b], img_w = sizes[2 * b + 1];
      const float* base = soa.data() + b * 9 * G;
      const Gts t{base, base + G, base + 2 * G, base + 3 * G, base + 4 * G,
                  base + 5 * G, base + 6 * G, base + 7 * G, base + 8 * G};
      const int32_t* lab = labels_of.data() + b * (std::min(G, K) + 1);
      const int32_t* sl = slot.data() + b * G;
      const int64_t D = n_labels[b];
      for (int64_t q = q0; q < q1; ++q) {
        const scalar_t* row = logits + b * s_lb + q * s_lq;
        if (P.focal) {
          for (int64_t d = 0; d < D; ++d)
            cls[d] = focal_cost(static_cast<float>(row[lab[d] * s_lk]), P) * P.cls_w;
        } else {
          float m = static_cast<float>(row[0]);
          for (int64_t k = 1; k < K; ++k) m = std::max(m, static_cast<float>(row[k * s_lk]));
          double s = 0.0;  // accumulated in double: one rounding instead of K
          for (int64_t k = 0; k < K; ++k) s += std::exp(static_cast<float>(row[k * s_lk]) - m);
          const float inv = 1.0f / static_cast<float>(s);
          for (int64_t d = 0; d < D; ++d)
            cls[d] = -(std::exp(static_cast<float>(row[lab[d] * s_lk]) - m) * inv) * P.cls_w;
        }
        float* o = out + (b * Q + q) * G;
        for (int64_t g = 0; g < G; ++g) o[g] = cls[sl[g]];
        const float* pb = pred + (b * Q + q) * 4;
        float pn[4];
        normalise(pb, img_h, img_w, pn);
        const float area_p = (pb[2] - pb[0]) * (pb[3] - pb[1]);
        box_terms(o, G, t, pb, area_p, pn, P.l1_w, P.giou_w);
      }
    }
  });
}

at::Tensor detr_match_cost_cpu(const at::Tensor& logits_in, const at::Tensor& pred_in, const at::Tensor& gt_in,
                               const at::Tensor& labels_in, const at::Tensor& sizes_in,
                               const c10::optional<at::Tensor>& mask_in, c10::string_view cls_cost,
                               double cls_weight, double l1_weight, double giou_weight, double focal_alpha,
                               double focal_gamma, double eps) {
  TORCH_CHECK(cls_cost == "softmax" || cls_cost == "focal",
              "detr_match_cost: cls_cost must be 'softmax' or 'focal', got '", std::string(cls_cost), "'");
  TORCH_CHECK(logits_in.dim() == 3 && at::isFloatingType(logits_in.scalar_type()),
              "detr_match_cost: pred_logits must be (B, Q, K) floating point, got shape ", logits_in.sizes(),
              " dtype ", logits_in.scalar_type());
  const int64_t B = logits_in.size(0), Q = logits_in.size(1), K = logits_in.size(2);
  TORCH_CHECK(gt_in.dim() == 3 && gt_in.size(0) == B && gt_in.size(2) == 4 &&
                  at::isFloatingType(gt_in.scalar_type()),
              "detr_match_cost: gt_boxes must be (B, G, 4) floating point with B = ", B, ", got shape ",
              gt_in.sizes(), " dtype ", gt_in.scalar_type());
  const int64_t G = gt_in.size(1);
  TORCH_CHECK(pred_in.dim() == 3 && pred_in.size(0) == B && pred_in.size(1) == Q && pred_in.size(2) == 4 &&
                  at::isFloatingType(pred_in.scalar_type()),
              "detr_match_cost: pred_boxes must be (B, Q, 4) = (", B, ", ", Q, ", 4) floating point, got shape ",
              pred_in.sizes(), " dtype ", pred_in.scalar_type());
  TORCH_CHECK(labels_in.dim() == 2 && labels_in.size(0) == B && labels_in.size(1) == G &&
                  at::isIntegralType(labels_in.scalar_type(), /*includeBool=*/false),
              "detr_match_cost: gt_labels must be (B, G) = (", B, ", ", G, ") integer, got shape ",
              labels_in.sizes(), " dtype ", labels_in.scalar_type());
  TORCH_CHECK(sizes_in.dim() == 2 && sizes_in.size(0) == B && sizes_in.size(1) == 2,
              "detr_match_cost: image_sizes must be (B, 2) = (", B, ", 2), got shape ", sizes_in.sizes());
  if (mask_in.has_value())
    TORCH_CHECK(mask_in->dim() == 2 && mask_in->size(0) == B && mask_in->size(1) == G &&
                    mask_in->scalar_type() == at::kBool,
                "detr_match_cost: gt_mask must be (B, G) = (", B, ", ", G, ") bool, got shape ", mask_in->sizes(),
                " dtype ", mask_in->scalar_type());
  TORCH_CHECK(K > 0 || G == 0 || Q == 0, "detr_match_cost: pred_logits must have at least one class");
  auto opts = logits_in.options().dtype(at::kFloat);
  if (B == 0 || Q == 0 || G == 0) return at::zeros({B, Q, G}, opts);  // as the reference

  const Params P{cls_cost == "focal",
                 static_cast<float>(cls_weight),
                 static_cast<float>(l1_weight),
                 static_cast<float>(giou_weight),
                 static_cast<float>(focal_alpha),
                 static_cast<float>(1.0 - focal_alpha),
                 focal_gamma,
                 static_cast<float>(eps)};
  // Boxes, sizes and labels are small ((B, Q, 4) at most): brought to contiguous float32 /
  // int64 here (.float() in the reference too); the logits are read in place, any strides.
  const at::Tensor pred = pred_in.to(at::kFloat).contiguous();
  const at::Tensor gts = gt_in.to(at::kFloat).contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor sizes = sizes_in.to(at::kFloat).contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::ones({B, G}, opts.dtype(at::kBool));
  const float* gp = gts.data_ptr<float>();
  const int64_t* lp = labels.data_ptr<int64_t>();
  const bool* mp = mask.data_ptr<bool>();
  const float* sp = sizes.data_ptr<float>();

  // Per image: gts as SoA, the distinct labels and each gt's slot among them.
  const int64_t max_labels = std::min(G, K) + 1;
  std::vector<float> soa(B * 9 * G);
  std::vector<int32_t> slot(B * G), labels_of(B * max_labels);
  std::vector<int64_t> n_labels(B);
  std::vector<int32_t> slot_of_label(K, -1);
  for (int64_t b = 0; b < B; ++b) {
    float* s = soa.data() + b * 9 * G;
    int32_t* lab = labels_of.data() + b * max_labels;
    int64_t D = 0;
    for (int64_t g = 0; g < G; ++g) {
      const bool real = mp[b * G + g];
      float box[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (real) std::copy(gp + (b * G + g) * 4, gp + (b * G + g) * 4 + 4, box);
      float n[4];
      normalise(box, sp[2 * b], sp[2 * b + 1], n);
      const float v[9] = {box[0], box[1], box[2], box[3], (box[2] - box[0]) * (box[3] - box[1]),
                          n[0], n[1], n[2], n[3]};
      for (int i = 0; i < 9; ++i) s[i * G + g] = v[i];
      const int64_t l = real ? std::min(std::max<int64_t>(lp[b * G + g], 0), K - 1) : 0;
      if (slot_of_label[l] < 0) slot_of_label[l] = static_cast<int32_t>(D), lab[D++] = static_cast<int32_t>(l);
      slot[b * G + g] = slot_of_label[l];
    }
    for (int64_t d = 0; d < D; ++d) slot_of_label[lab[d]] = -1;
    n_labels[b] = D;
  }

  at::Tensor out = at::empty({B, Q, G}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_in.scalar_type(), "detr_match_cost_cpu", [&] {
    compute<scalar_t>(logits_in.const_data_ptr<scalar_t>(), logits_in.stride(0), logits_in.stride(1),
                      logits_in.stride(2), pred.data_ptr<float>(), sp, soa, slot, labels_of, n_labels, B, Q, G,
                      K, P, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rtmdet, CPU, m) { m.impl("detr_match_cost", &detr_match_cost_cpu); }

// A matching input, not a loss: no gradient. A fallthrough says so to the dispatcher (the
// output never requires grad) instead of the autograd fallback's warning at backward time.
TORCH_LIBRARY_IMPL(rtmdet, Autograd, m) {
  m.impl("detr_match_cost", torch::CppFunction::makeFallthrough());
}

}  // namespace rtmdet

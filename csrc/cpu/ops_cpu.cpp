// CPU kernels of the small ops: box_iou, quality_focal_loss (+ backward), giou_loss
// (+ backward) and nms. Float64 inputs compute in float64 (for gradcheck); every other float
// dtype computes in float32, as the references in rtmdet/ops/ do.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "common.h"

namespace rtmdet {
namespace {

void check_boxes(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == 4, op, ": ", name, " must be (M, 4) xyxy boxes, got shape ",
              t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

// The dtype the references compute in: float64 stays, the rest becomes float32.
at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- box_iou ----------------------------------------------------------------------------------
at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2, bool giou, bool aligned,
                       double eps) {
  check_boxes("box_iou", "boxes1", boxes1);
  check_boxes("box_iou", "boxes2", boxes2);
  const int64_t M = boxes1.size(0), K = boxes2.size(0);
  TORCH_CHECK(!aligned || M == K, "box_iou(aligned=True): boxes1 and boxes2 must have the same rows, got ",
              M, " and ", K);
  auto out_dtype = at::promote_types(boxes1.scalar_type(), boxes2.scalar_type());
  auto ct = compute_dtype(out_dtype);
  at::Tensor a = boxes1.to(ct).contiguous(), b = boxes2.to(ct).contiguous();
  at::Tensor out = aligned ? at::empty({M}, a.options()) : at::empty({M, K}, a.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "box_iou", [&] {
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    at::parallel_for(0, M, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        if (aligned) {
          po[i] = box_iou_pair(pa + 4 * i, pb + 4 * i, giou, e);
        } else {
          for (int64_t j = 0; j < K; ++j) po[i * K + j] = box_iou_pair(pa + 4 * i, pb + 4 * j, giou, e);
        }
      }
    });
  });
  return out.to(out_dtype);
}

// ---- quality focal loss -----------------------------------------------------------------------
struct QflInputs {
  at::Tensor logits, labels, scores;
  at::ScalarType ct;
};

QflInputs qfl_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& scores) {
  TORCH_CHECK(logits.dim() == 2, "quality_focal_loss: logits must be (M, C), got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "quality_focal_loss: logits must be floating point, got ",
              logits.scalar_type());
  const int64_t M = logits.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == M && at::isIntegralType(labels.scalar_type(), false),
              "quality_focal_loss: labels must be an integer (M,) = (", M, ",) tensor, got ", labels.sizes(), " ",
              labels.scalar_type());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == M && at::isFloatingType(scores.scalar_type()),
              "quality_focal_loss: scores must be a floating (M,) = (", M, ",) tensor, got ", scores.sizes(),
              " ", scores.scalar_type());
  auto ct = compute_dtype(logits.scalar_type());
  return {logits.contiguous(), labels.to(at::kLong).contiguous(), scores.to(ct).contiguous(), ct};
}

// Loss terms of one logit: negative BCE(x, 0) s^beta, positive BCE(x, y) |y - s|^beta.
template <typename T>
inline T powb(T v, T beta) {
  return beta == T(2) ? v * v : std::pow(v, beta);
}

template <typename scalar_t>
void qfl_forward_kernel(const QflInputs& in, double beta_d, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = in.logits.size(0), C = in.logits.size(1);
  const scalar_t* x = in.logits.data_ptr<scalar_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  const acc_t* sc = in.scores.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const acc_t beta = static_cast<acc_t>(beta_d);
  at::parallel_for(0, M, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      acc_t total = 0;
      const int64_t pos = (lab[m] >= 0 && lab[m] < C) ? lab[m] : -1;
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = static_cast<acc_t>(x[m * C + c]);
        acc_t s = sigmoid(v), ls = log_sigmoid(v);
        if (c == pos) {
          acc_t y = sc[m];
          total += bce_logits(v, y, ls) * powb(std::abs(y - s), beta);
        } else {
          total += bce_logits(v, acc_t(0), ls) * powb(s, beta);
        }
      }
      o[m] = total;
    }
  });
}

at::Tensor qfl_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& scores, double beta) {
  QflInputs in = qfl_inputs(logits, labels, scores);
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(in.ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "quality_focal_loss",
                                  [&] { qfl_forward_kernel<scalar_t>(in, beta, out); });
  return out;
}

template <typename scalar_t>
void qfl_backward_kernel(const QflInputs& in, const at::Tensor& grad, double beta_d, at::Tensor& gx,
                         at::Tensor& gs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = in.logits.size(0), C = in.logits.size(1);
  const scalar_t* x = in.logits.data_ptr<scalar_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  const acc_t* sc = in.scores.data_ptr<acc_t>();
  const acc_t* g = grad.data_ptr<acc_t>();
  scalar_t* ox = gx.data_ptr<scalar_t>();
  acc_t* os = gs.data_ptr<acc_t>();
  const acc_t beta = static_cast<acc_t>(beta_d);
  at::parallel_for(0, M, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      const int64_t pos = (lab[m] >= 0 && lab[m] < C) ? lab[m] : -1;
      os[m] = 0;
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = static_cast<acc_t>(x[m * C + c]);
        acc_t s = sigmoid(v), ls = log_sigmoid(v);
        acc_t ds = s * (1 - s);  // d sigmoid / dx; d log_sigmoid / dx = 1 - s
        acc_t d;
        if (c == pos) {
          // L = BCE(x, y) q, q = |y - s|^beta; dBCE/dx = s - y, dBCE/dy = -x
          acc_t y = sc[m], diff = y - s, bce = bce_logits(v, y, ls);
          acc_t q = powb(std::abs(diff), beta);
          acc_t dq_ddiff = beta * powb(std::abs(diff), beta - 1) * (diff > 0 ? 1 : (diff < 0 ? -1 : 0));
          d = (s - y) * q - bce * dq_ddiff * ds;
          os[m] = g[m] * (-v * q + bce * dq_ddiff);
        } else {
          // L = softplus(x) s^beta
          d = s * powb(s, beta) + bce_logits(v, acc_t(0), ls) * beta * powb(s, beta - 1) * ds;
        }
        ox[m * C + c] = static_cast<scalar_t>(g[m] * d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> qfl_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                   const at::Tensor& labels, const at::Tensor& scores,
                                                   double beta) {
  QflInputs in = qfl_inputs(logits, labels, scores);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == logits.size(0), "quality_focal_loss_backward: grad must be (M,)");
  at::Tensor g = grad.to(in.ct).contiguous();
  at::Tensor gx = at::empty(logits.sizes(), logits.options());
  at::Tensor gs = at::empty({logits.size(0)}, logits.options().dtype(in.ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "quality_focal_loss_backward",
                                  [&] { qfl_backward_kernel<scalar_t>(in, g, beta, gx, gs); });
  return {gx, gs.to(scores.scalar_type())};
}

// ---- GIoU loss ----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::ScalarType> giou_inputs(const at::Tensor& pred, const at::Tensor& target) {
  check_boxes("giou_loss", "pred", pred);
  check_boxes("giou_loss", "target", target);
  TORCH_CHECK(pred.size(0) == target.size(0), "giou_loss: pred and target must have the same rows, got ",
              pred.size(0), " and ", target.size(0));
  auto out_dtype = at::promote_types(pred.scalar_type(), target.scalar_type());
  auto ct = compute_dtype(out_dtype);
  return {pred.to(ct).contiguous(), target.to(ct).contiguous(), out_dtype};
}

at::Tensor giou_loss_cpu(const at::Tensor& pred, const at::Tensor& target, double eps) {
  auto [p, t, out_dtype] = giou_inputs(pred, target);
  const int64_t M = p.size(0);
  at::Tensor out = at::empty({M}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "giou_loss", [&] {
    const scalar_t *pp = p.data_ptr<scalar_t>(), *pt = t.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    at::parallel_for(0, M, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) po[i] = scalar_t(1) - box_iou_pair(pp + 4 * i, pt + 4 * i, true, e);
    });
  });
  return out.to(out_dtype);
}

// d min(a, b) / da and d max(a, b) / da with PyTorch's rule: ties split the gradient in half.
template <typename T>
inline T dmin(T a, T b) { return a < b ? T(1) : (a == b ? T(0.5) : T(0)); }
template <typename T>
inline T dmax(T a, T b) { return a > b ? T(1) : (a == b ? T(0.5) : T(0)); }

// Gradient of 1 - GIoU(p, t) times g, w.r.t. both boxes (clamps pass the gradient at >= bound).
template <typename T>
void giou_grad(const T* p, const T* t, T g, T eps, T* dp, T* dt) {
  T ap = (p[2] - p[0]) * (p[3] - p[1]), at_ = (t[2] - t[0]) * (t[3] - t[1]);
  T iw_raw = std::min(p[2], t[2]) - std::max(p[0], t[0]);
  T ih_raw = std::min(p[3], t[3]) - std::max(p[1], t[1]);
  T w = std::max(iw_raw, T(0)), h = std::max(ih_raw, T(0));
  T inter = w * h;
  T u_raw = ap + at_ - inter, u = std::max(u_raw, eps);
  T ew_raw = std::max(p[2], t[2]) - std::min(p[0], t[0]);
  T eh_raw = std::max(p[3], t[3]) - std::min(p[1], t[1]);
  T ew = std::max(ew_raw, T(0)), eh = std::max(eh_raw, T(0));
  T e_raw = ew * eh, e = std::max(e_raw, eps);
  // giou = inter / u - (e - u) / e
  T d_giou = -g;
  T d_inter = d_giou / u;
  T d_u = d_giou * (-inter / (u * u) + T(1) / e);
  T d_e = d_giou * (-u / (e * e));
  T d_uraw = u_raw >= eps ? d_u : T(0);
  d_inter -= d_uraw;
  T d_iw = iw_raw >= 0 ? d_inter * h : T(0), d_ih = ih_raw >= 0 ? d_inter * w : T(0);
  T d_eraw = e_raw >= eps ? d_e : T(0);
  T d_ew = ew_raw >= 0 ? d_eraw * eh : T(0), d_eh = eh_raw >= 0 ? d_eraw * ew : T(0);
  for (int axis = 0; axis < 2; ++axis) {  // 0: x (w), 1: y (h)
    int lo = axis, hi = axis + 2;
    T d_inside = axis == 0 ? d_iw : d_ih, d_encl = axis == 0 ? d_ew : d_eh;
    T side_p = p[3 - axis] - p[1 - axis], side_t = t[3 - axis] - t[1 - axis];  // other extent
    dp[hi] = d_inside * dmin(p[hi], t[hi]) + d_encl * dmax(p[hi], t[hi]) + d_uraw * side_p;
    dt[hi] = d_inside * dmin(t[hi], p[hi]) + d_encl * dmax(t[hi], p[hi]) + d_uraw * side_t;
    dp[lo] = -d_inside * dmax(p[lo], t[lo]) - d_encl * dmin(p[lo], t[lo]) - d_uraw * side_p;
    dt[lo] = -d_inside * dmax(t[lo], p[lo]) - d_encl * dmin(t[lo], p[lo]) - d_uraw * side_t;
  }
}

std::tuple<at::Tensor, at::Tensor> giou_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& pred,
                                                         const at::Tensor& target, double eps) {
  auto [p, t, out_dtype] = giou_inputs(pred, target);
  const int64_t M = p.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == M, "giou_loss_backward: grad must be (M,)");
  at::Tensor g = grad.to(p.scalar_type()).contiguous();
  at::Tensor dp = at::empty_like(p), dt = at::empty_like(t);
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "giou_loss_backward", [&] {
    const scalar_t *pp = p.data_ptr<scalar_t>(), *pt = t.data_ptr<scalar_t>(), *pg = g.data_ptr<scalar_t>();
    scalar_t *odp = dp.data_ptr<scalar_t>(), *odt = dt.data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    at::parallel_for(0, M, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) giou_grad(pp + 4 * i, pt + 4 * i, pg[i], e, odp + 4 * i, odt + 4 * i);
    });
  });
  return {dp.to(pred.scalar_type()), dt.to(target.scalar_type())};
}

// ---- NMS --------------------------------------------------------------------------------------------
at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
  check_boxes("nms", "boxes", boxes);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), "nms: scores must be (M,) = (",
              boxes.size(0), ",), got ", scores.sizes());
  const int64_t M = boxes.size(0);
  // Decreasing score, ties to the lower index (a stable sort), as nms_ref.
  at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  at::Tensor b = boxes.to(compute_dtype(boxes.scalar_type())).index_select(0, order).contiguous();
  std::vector<uint8_t> suppressed(M, 0);
  std::vector<int64_t> keep;
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "nms", [&] {
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const auto thr = static_cast<scalar_t>(iou_threshold);
    for (int64_t i = 0; i < M; ++i) {
      if (suppressed[i]) continue;
      keep.push_back(i);
      for (int64_t j = i + 1; j < M; ++j)
        if (!suppressed[j] && box_iou_pair(pb + 4 * i, pb + 4 * j, false, scalar_t(0)) > thr) suppressed[j] = 1;
    }
  });
  at::Tensor kept = at::empty({(int64_t)keep.size()}, order.options());
  std::copy(keep.begin(), keep.end(), kept.data_ptr<int64_t>());
  return order.index_select(0, kept);
}

}  // namespace

TORCH_LIBRARY_IMPL(rtmdet, CPU, m) {
  m.impl("box_iou", &box_iou_cpu);
  m.impl("quality_focal_loss", &qfl_cpu);
  m.impl("quality_focal_loss_backward", &qfl_backward_cpu);
  m.impl("giou_loss", &giou_loss_cpu);
  m.impl("giou_loss_backward", &giou_loss_backward_cpu);
  m.impl("nms", &nms_cpu);
}

}  // namespace rtmdet

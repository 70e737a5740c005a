// Scalar maths shared by the CPU ops. Every function follows the float operation order of
// the PyTorch references in rtmdet/ops/ (geometry._iou, dsla.soft_cls_cost) so that the
// results agree to the last bit or two; setup.py compiles with -ffp-contract=off so that
// no a*b+c is fused behind our back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace rtmdet {

// IoU (or GIoU) of two xyxy boxes, as geometry._iou: inter / max(union, eps).
template <typename T>
inline T box_iou_pair(const T* a, const T* b, bool giou, T eps) {
  T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  T w = std::max(std::min(a[2], b[2]) - std::max(a[0], b[0]), T(0));
  T h = std::max(std::min(a[3], b[3]) - std::max(a[1], b[1]), T(0));
  T inter = w * h;
  T uni = std::max(area_a + area_b - inter, eps);
  T iou = inter / uni;
  if (!giou) return iou;
  T ew = std::max(std::max(a[2], b[2]) - std::min(a[0], b[0]), T(0));
  T eh = std::max(std::max(a[3], b[3]) - std::min(a[1], b[1]), T(0));
  T enclose = std::max(ew * eh, eps);
  return iou - (enclose - uni) / enclose;
}

// PyTorch's log_sigmoid: min(x, 0) - log1p(exp(-|x|)).
template <typename T>
inline T log_sigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// BCEWithLogits(x, y) as PyTorch computes it: (1 - y) * x - log_sigmoid(x).
template <typename T>
inline T bce_logits(T x, T y, T logsig) {
  return (T(1) - y) * x - logsig;
}

// Order-preserving map of a float to uint32 (+0 == -0, +inf largest), as dsla.ordered_key.
inline uint32_t ordered_key(float v) {
  if (v == 0.0f) v = 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace rtmdet

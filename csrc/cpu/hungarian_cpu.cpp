// Exact batched linear sum assignment on the CPU (SPEC section 4): torch.ops.rtmdet.hungarian_match.
//
// hungarian_match(cost (B, Q, G) float32/float64, gt_mask (B, G) bool)
//   -> (match (B, Q) int64: gt index per query, -1 = unmatched; status (B,) int32: 1 = infeasible)
//
// One image per task of at::parallel_for. Each image is solved on its real gts only, as an
// R x C problem with R <= C (every row matched): rows = the G_b real gts and columns = the Q
// queries when G_b <= Q (the usual DETR case), else rows = queries and columns = real gts.
// Algorithm: shortest augmenting paths with dual potentials u (rows), v (columns) in float64
// (Dijkstra over columns on the reduced costs c - u - v >= 0, then the potential update and
// the augmentation), as in Crouse, "On implementing 2D rectangular assignment algorithms"
// (IEEE TAES 2016); it starts from a greedy dual: u_i = min_j c_ij, v = 0, and row i takes its
// cheapest column if no earlier row has it (a tight edge, so the state is dual feasible); only
// the rows left over are augmented. v stays 0 on never-matched columns, the rectangular case's
// optimality condition. Ties, here and in kernels/hungarian.py (same arithmetic, same order,
// so both return the same matching): the smallest distance, then an unmatched column (ends the
// search), then the lowest column index. +inf = forbidden; no finite path left = infeasible.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace rtmdet {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// (d, matched, j) lexicographically smaller than (best_d, best_matched, best_j)?
inline bool better(double d, bool matched, int64_t j, double best_d, bool best_matched, int64_t best_j) {
  if (d != best_d) return d < best_d;
  if (matched != best_matched) return !matched;
  return j < best_j;
}

// The compacted cost stays in its own dtype (float32 halves the memory traffic of every scan;
// widening to double on use is exact); potentials and distances are double.
template <typename T>
struct Workspace {
  std::vector<T> c;
  std::vector<double> u, v, d;
  std::vector<int64_t> col4row, row4col, path, remaining;
  std::vector<char> visited;
};

// Solve the R x C problem in ws.c (row-major, R <= C); fills ws.col4row. False if infeasible.
template <typename T>
bool solve(Workspace<T>& ws, int64_t R, int64_t C) {
  const T* c = ws.c.data();
  ws.u.assign(R, 0.0);
  ws.v.assign(C, 0.0);
  ws.col4row.assign(R, -1);
  ws.row4col.assign(C, -1);
  auto& u = ws.u;
  auto& v = ws.v;
  auto& col4row = ws.col4row;
  auto& row4col = ws.row4col;
  for (int64_t i = 0; i < R; ++i) {  // greedy dual start
    const T* ci = c + i * C;
    int64_t best = 0;
    for (int64_t j = 1; j < C; ++j)
      if (ci[j] < ci[best]) best = j;
    if (!(ci[best] < kInf)) return false;  // a row without a finite entry
    u[i] = ci[best];
    if (row4col[best] < 0) row4col[best] = i, col4row[i] = best;
  }
  ws.d.resize(C);
  ws.path.resize(C);
  ws.visited.resize(C);
  ws.remaining.resize(C);
  auto& d = ws.d;
  auto& path = ws.path;
  auto& visited = ws.visited;
  auto& remaining = ws.remaining;
  for (int64_t cur = 0; cur < R; ++cur) {
    if (col4row[cur] >= 0) continue;
    std::fill(d.begin(), d.end(), kInf);
    std::fill(visited.begin(), visited.end(), 0);
    for (int64_t j = 0; j < C; ++j) remaining[j] = j;
    int64_t n_remaining = C;  // unvisited columns, in any order (ties compare indices)
    int64_t i = cur, sink = -1;
    double min_val = 0.0;
    while (sink < 0) {
      const T* ci = c + i * C;
      const double ui = u[i];
      int64_t best_k = -1;
      double best_d = kInf;
      bool best_matched = true;
      int64_t best_j = C;
      for (int64_t k = 0; k < n_remaining; ++k) {
        const int64_t j = remaining[k];
        const double r = min_val + static_cast<double>(ci[j]) - ui - v[j];
        if (r < d[j]) d[j] = r, path[j] = i;
        if (better(d[j], row4col[j] >= 0, j, best_d, best_matched, best_j))
          best_k = k, best_d = d[j], best_matched = row4col[j] >= 0, best_j = j;
      }
      if (!(best_d < kInf)) return false;  // no augmenting path over finite costs
      min_val = best_d;
      visited[best_j] = 1;
      remaining[best_k] = remaining[--n_remaining];
      if (row4col[best_j] < 0)
        sink = best_j;
      else
        i = row4col[best_j];
    }
    // Potentials: the visited rows and columns move by min_val - d (0 at the sink).
    u[cur] += min_val;
    for (int64_t j = 0; j < C; ++j) {
      if (!visited[j] || j == sink) continue;
      const double delta = min_val - d[j];
      u[row4col[j]] += delta;
      v[j] -= delta;
    }
    for (int64_t j = sink;;) {  // flip the path's edges
      const int64_t r = path[j];
      row4col[j] = r;
      std::swap(col4row[r], j);
      if (r == cur) break;
    }
  }
  return true;
}

template <typename T>
void solve_image(const T* cost, const bool* mask, int64_t Q, int64_t G, int64_t* match, int32_t* status,
                 Workspace<T>& ws) {
  std::vector<int64_t> real;
  for (int64_t g = 0; g < G; ++g)
    if (mask[g]) real.push_back(g);
  const int64_t Gb = static_cast<int64_t>(real.size());
  std::fill(match, match + Q, -1);
  *status = 0;
  if (Gb == 0 || Q == 0) return;
  const bool gts_are_rows = Gb <= Q;
  const int64_t R = gts_are_rows ? Gb : Q, C = gts_are_rows ? Q : Gb;
  ws.c.resize(R * C);
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t k = 0; k < Gb; ++k) {
      ws.c[gts_are_rows ? k * Q + q : q * Gb + k] = cost[q * G + real[k]];
    }
  if (!solve(ws, R, C)) {
    *status = 1;
    return;
  }
  for (int64_t i = 0; i < R; ++i) {
    const int64_t j = ws.col4row[i];
    if (gts_are_rows)
      match[j] = real[i];
    else
      match[i] = real[j];
  }
}

std::tuple<at::Tensor, at::Tensor> hungarian_match_cpu(const at::Tensor& cost_in, const at::Tensor& mask_in) {
  TORCH_CHECK(cost_in.dim() == 3, "hungarian_match: cost must be (B, Q, G), got shape ", cost_in.sizes());
  const auto st = cost_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "hungarian_match: cost must be float32 or float64, got ", st);
  const int64_t B = cost_in.size(0), Q = cost_in.size(1), G = cost_in.size(2);
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == B && mask_in.size(1) == G &&
                  mask_in.scalar_type() == at::kBool,
              "hungarian_match: gt_mask must be (B, G) = (", B, ", ", G, ") bool, got shape ", mask_in.sizes(),
              " dtype ", mask_in.scalar_type());
  at::Tensor cost = cost_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor match = at::empty({B, Q}, cost.options().dtype(at::kLong));
  at::Tensor status = at::empty({B}, cost.options().dtype(at::kInt));
  const bool* m = mask.data_ptr<bool>();
  int64_t* out = match.data_ptr<int64_t>();
  int32_t* stat = status.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(st, "hungarian_match_cpu", [&] {
    const scalar_t* c = cost.data_ptr<scalar_t>();
    // Small problems run inline: waking the thread pool costs more than solving them.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, Q * G));
    at::parallel_for(0, B, grain, [&](int64_t lo, int64_t hi) {
      Workspace<scalar_t> ws;
      for (int64_t b = lo; b < hi; ++b)
        solve_image(c + b * Q * G, m + b * G, Q, G, out + b * Q, stat + b, ws);
    });
  });
  return {match, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(rtmdet, CPU, m) { m.impl("hungarian_match", &hungarian_match_cpu); }

}  // namespace rtmdet

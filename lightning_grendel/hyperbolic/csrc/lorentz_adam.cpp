// One Riemannian Adam step for a table of points on the hyperboloid <x,x>_L = -k, in one pass over its rows.
//
// Follows lightning_grendel/hyperbolic/optim.py's reference path (geoopt's RiemannianAdam over
// LorentzManifold, whose maths is lightning_grendel/hyperbolic/math.py), row by row:
//   g  = grad + wd x;  r = egrad2rgrad(x, g) = g' + <x, g'>_L x / k   (g' = g with its time sign flipped)
//   m  = b1 m + (1 - b1) r;  v = b2 v + (1 - b2) <r, r>_L             (v: one value per row)
//   u  = -lr (m / bc1) / (sqrt(v / bc2) + eps)
//   expmap:     y = projx(cosh(t) x + sqrt(k) sinh(t) u / |u|_L),  t = min(|u|_L / sqrt(k), 32)
//               m = m + <y, m>_L / max(k - <x, y>_L, tiny) (x + y)   (parallel transport)
//   projection: y = projx(x + u, max_norm);  m = m + <y, m>_L y / k  (tangent projection)
//   stabilize:  y = projx(y, max_norm);      m = m + <y, m>_L y / k
// projx keeps the space part (clipped to max_norm when given) and solves the time coordinate.
// The reference does each of these as a pass over the whole table (about 35 of them, each allocating a
// table-sized temporary); here each row stays in cache from the gradient to the new point, in about ten
// loops over its coordinates. Rows are independent, so the result does not depend on the thread count.

#include <torch/extension.h>

#include <ATen/Parallel.h>


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Settings {
  double lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, k, max_norm;
  bool projection, stabilize;
  int64_t v_columns;  // exp_avg_sq is (rows, 1), or (rows, d) with equal columns as geoopt keeps it
};

// Per-coordinate weights, so that every reduction runs over the whole row (a vector loop with no odd
// remainder): the Minkowski sign (-1, 1, ..., 1) and the space mask (0, 1, ..., 1).
template <typename T>
struct Weights {
  std::vector<T> sign, space;
  explicit Weights(int64_t d) : sign(d, T(1)), space(d, T(1)) { sign[0] = T(-1), space[0] = T(0); }
};

template <typename T>
inline T weighted_dot(const T* __restrict w, const T* __restrict a, const T* __restrict b, int64_t d) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) sum += w[j] * a[j] * b[j];
  return sum;
}

// cosh and sinh of one argument; optimiser steps are short (theta ~ lr sqrt(d)), where the Taylor series
// to theta^9 / theta^10 is exact to the last bit in double and costs a few multiplications.
template <typename T>
inline void cosh_sinh(T theta, T& ch, T& sh) {
  if (theta < T(0.0625)) {
    const T t2 = theta * theta;
    sh = theta * (T(1) + t2 / T(6) * (T(1) + t2 / T(20) * (T(1) + t2 / T(42) * (T(1) + t2 / T(72)))));
    ch = T(1) + t2 / T(2) * (T(1) + t2 / T(12) * (T(1) + t2 / T(30) * (T(1) + t2 / T(56) * (T(1) + t2 / T(90)))));
  } else {
    ch = std::cosh(theta);
    sh = std::sinh(theta);
  }
}

// time = sqrt(k + |space|^2) for a point whose squared space norm is `sq`, after clipping that norm to
// max_norm (when > 0): projx.
template <typename T>
inline void project_point(const Weights<T>& w, T* __restrict y, T sq, int64_t d, T k, T max_norm, T tiny) {
  if (max_norm > 0) {
    const T factor = std::min(max_norm / std::max(std::sqrt(sq), tiny), T(1));
    if (factor < T(1)) {
#pragma omp simd
      for (int64_t j = 1; j < d; ++j) y[j] *= factor;
      sq = weighted_dot(w.space.data(), y, y, d);
    }
  }
  y[0] = std::sqrt(k + sq);
}

// m += <y, m>_L y / k: the tangent projection onto T_y.
template <typename T>
inline void project_tangent(const Weights<T>& w, const T* __restrict y, T* __restrict m, int64_t d, T k) {
  const T a = weighted_dot(w.sign.data(), y, m, d) / k;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) m[j] += a * y[j];
}

// kDim > 0 fixes the row length at compile time (the loops unroll into a few vector instructions); kDim = 0
// takes it from `dim`. The step is instruction-bound, so each loop over a row does as much as it can:
// the reductions a later stage needs are accumulated while their operands are written, and the step
// u = c m (c a per-row scalar) is never stored: <u, u>_L = c^2 <m, m>_L and y = ch x + (along c) m.
template <typename T, int kDim>
void step_rows(T* x, const T* grad, T* m, T* v, int64_t begin, int64_t end, int64_t dim, const Settings& s) {
  const int64_t d = kDim > 0 ? kDim : dim;
  const T tiny = sizeof(T) == sizeof(float) ? T(1e-7) : T(1e-15);  // math._eps
  const T k = T(s.k), sqrt_k = std::sqrt(k), max_norm = T(s.max_norm), lr = T(s.lr), eps = T(s.eps);
  const T b1 = T(s.beta1), b2 = T(s.beta2), c1 = T(1) - b1, c2 = T(1) - b2, wd = T(s.weight_decay);
  const T bc1 = T(s.bias_correction1), bc2 = T(s.bias_correction2);
  const Weights<T> w(d);
  const T* __restrict sign = w.sign.data();
  const T* __restrict space = w.space.data();
  std::vector<T> scratch(2 * d);
  T* __restrict r = scratch.data();
  T* __restrict y = r + d;
  for (int64_t i = begin; i < end; ++i) {
    T* __restrict xi = x + i * d;
    const T* __restrict gi = grad + i * d;
    T* __restrict mi = m + i * d;
    T* __restrict vi = v + i * s.v_columns;
    // r = g' (the gradient, weight decay added, with its index raised), <x, r>_L
    T xr = 0;
#pragma omp simd reduction(+ : xr)
    for (int64_t j = 0; j < d; ++j) {
      r[j] = sign[j] * (gi[j] + wd * xi[j]);
      xr += sign[j] * xi[j] * r[j];
    }
    // r = g' + <x, g'>_L x / k (Riemannian gradient); m = b1 m + (1 - b1) r; <r, r>_L and <m, m>_L
    const T a = xr / k;
    T rr = 0, mm = 0;
#pragma omp simd reduction(+ : rr, mm)
    for (int64_t j = 0; j < d; ++j) {
      r[j] += a * xi[j];
      mi[j] = mi[j] * b1 + c1 * r[j];
      rr += sign[j] * r[j] * r[j];
      mm += sign[j] * mi[j] * mi[j];
    }
    // v is one value per row (geoopt stores it in every column: they only ever get the row's <r, r>_L)
    for (int64_t j = 0; j < s.v_columns; ++j) vi[j] = vi[j] * b2 + c2 * rr;
    const T c = -lr / bc1 / (std::sqrt(vi[0] / bc2) + eps);  // u = c m
    T sq = 0;
    if (s.projection) {  // y = projx(x + u, max_norm); m carried by tangent projection
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        y[j] = xi[j] + c * mi[j];
        sq += space[j] * y[j] * y[j];
      }
      project_point(w, y, sq, d, k, max_norm, tiny);
      project_tangent(w, y, mi, d, k);
    } else {  // y = projx(expmap_x(u)); m carried by parallel transport
      const T norm = std::sqrt(std::max(c * c * mm, tiny));
      T ch, sh;
      cosh_sinh(std::min(norm / sqrt_k, T(32)), ch, sh);  // math.MAX_THETA
      const T along = sqrt_k * sh / norm * c;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        y[j] = ch * xi[j] + along * mi[j];
        sq += space[j] * y[j] * y[j];
      }
      project_point(w, y, sq, d, k, T(-1), tiny);
      T ym = 0, xy = 0;
#pragma omp simd reduction(+ : ym, xy)
      for (int64_t j = 0; j < d; ++j) {
        ym += sign[j] * y[j] * mi[j];
        xy += sign[j] * xi[j] * y[j];
      }
      const T b = ym / std::max(k - xy, tiny);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) mi[j] += b * (xi[j] + y[j]);
    }
    if (s.stabilize) {  // projx(y, max_norm) (projx above left the space part, hence sq, as it was)
      project_point(w, y, s.projection ? weighted_dot(space, y, y, d) : sq, d, k, max_norm, tiny);
      project_tangent(w, y, mi, d, k);
    }
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) xi[j] = y[j];
  }
}

void lorentz_adam_step(torch::Tensor x, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                       double lr, double beta1, double beta2, double eps, double weight_decay,
                       double bias_correction1, double bias_correction2, double k, double max_norm,
                       bool projection, bool stabilize) {
  for (const auto& t : {grad, exp_avg, exp_avg_sq}) {
    TORCH_CHECK(t.dim() == x.dim() && t.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1) &&
                    (t.size(-1) == x.size(-1) || (t.is_same(exp_avg_sq) && t.size(-1) == 1)) &&
                    t.scalar_type() == x.scalar_type(),
                "lorentz_adam_step: the gradient and exp_avg must match the points' shape and dtype, exp_avg_sq "
                "too or have one column");
  }
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 2, "lorentz_adam_step: points need a time and a space coordinate");
  for (const auto& t : {x, grad, exp_avg, exp_avg_sq}) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "lorentz_adam_step: CPU contiguous tensors only");
  }
  const Settings s{lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, k, max_norm,
                   projection, stabilize, exp_avg_sq.size(-1)};
  const int64_t d = x.size(-1), n = x.numel() / d;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lorentz_adam_step", [&] {
    scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    scalar_t* pm = exp_avg.data_ptr<scalar_t>();
    scalar_t* pv = exp_avg_sq.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      switch (d) {
        case 16: return step_rows<scalar_t, 16>(px, pg, pm, pv, begin, end, d, s);
        case 32: return step_rows<scalar_t, 32>(px, pg, pm, pv, begin, end, d, s);
        case 64: return step_rows<scalar_t, 64>(px, pg, pm, pv, begin, end, d, s);
        default: return step_rows<scalar_t, 0>(px, pg, pm, pv, begin, end, d, s);
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lorentz_adam_step", &lorentz_adam_step,
        "One fused Riemannian Adam step of hyperboloid points (updates x, exp_avg, exp_avg_sq in place)");
}

// Fused EWA projection + spherical-harmonics colour of N Gaussians on C cameras, forward and backward, on the CPU.
//
// Follows lightning_grendel/splatting/projection.py (project_gaussians) and sh.py (sh_to_rgb), which stay the
// reference: the same near plane, safe depth, FOV clamp, low-pass filter, clamps and culling, with the
// products taken in the reference's order. The backward is the chain rule of those formulas with torch's
// conventions at the kinks: clamp_min passes the gradient only where its input > the minimum, torch.where passes
// it to the chosen branch, and maximum/minimum split it in half on ties. Culled pairs get gradients too, as
// under autograd. The backward recomputes the per-pair intermediates instead of saving them.
//
// One thread owns each Gaussian and walks the cameras in order, so every output and gradient is computed
// by exactly one thread in a fixed order: bit-identical results for any thread count.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

// The per-pair helpers are inlined into the loops over Gaussians (GCC keeps them out of line otherwise).
#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace {

constexpr double kNearPlane = 0.01;
constexpr double kLowPass = 0.3;
constexpr double kFovClampMargin = 0.3;
constexpr double kMinDet = 1e-12;
constexpr double kMinNorm = 1e-12;

constexpr double kC0 = 0.28209479177387814;
constexpr double kC1 = 0.4886025119029199;
constexpr double kC2[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                           0.5462742152960396};
constexpr double kC3[7] = {-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
                           -0.4570457994644658, 1.445305721320277, -0.5900435899266435};

template <typename T>
struct Camera {
  T rot[9], trans[3], center[3];
  T fx, fy, cx, cy, lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg, width, height;
};

template <typename T>
std::vector<Camera<T>> read_cameras(const torch::Tensor& viewmats, const torch::Tensor& intrinsics,
                                    const torch::Tensor& centers, int64_t width, int64_t height) {
  const auto v = viewmats.accessor<T, 3>();
  const auto k = intrinsics.accessor<T, 3>();
  const auto o = centers.accessor<T, 2>();
  std::vector<Camera<T>> cameras(viewmats.size(0));
  for (int64_t i = 0; i < viewmats.size(0); ++i) {
    Camera<T>& cam = cameras[i];
    for (int r = 0; r < 3; ++r) {
      for (int c = 0; c < 3; ++c) cam.rot[3 * r + c] = v[i][r][c];
      cam.trans[r] = v[i][r][3];
      cam.center[r] = o[i][r];
    }
    cam.fx = k[i][0][0];
    cam.fy = k[i][1][1];
    cam.cx = k[i][0][2];
    cam.cy = k[i][1][2];
    cam.width = T(width);
    cam.height = T(height);
    const T tan_x = T(0.5 * width) / cam.fx, tan_y = T(0.5 * height) / cam.fy;
    const T margin = T(kFovClampMargin);
    cam.lim_x_pos = (cam.width - cam.cx) / cam.fx + margin * tan_x;
    cam.lim_x_neg = cam.cx / cam.fx + margin * tan_x;
    cam.lim_y_pos = (cam.height - cam.cy) / cam.fy + margin * tan_y;
    cam.lim_y_neg = cam.cy / cam.fy + margin * tan_y;
  }
  return cameras;
}

// out = a @ b for row-major 3x3 matrices (transpose_b: a @ bᵀ; transpose_a: aᵀ @ b).
template <typename T>
inline void matmul3(const T* a, const T* b, T* out, bool transpose_a = false, bool transpose_b = false) {
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      T sum = T(0);
      for (int k = 0; k < 3; ++k) {
        const T x = transpose_a ? a[3 * k + i] : a[3 * i + k];
        const T y = transpose_b ? b[3 * j + k] : b[3 * k + j];
        sum += x * y;
      }
      out[3 * i + j] = sum;
    }
  }
}

// The world-space factor M = R(q̂) diag(s) of one Gaussian, its covariance M Mᵀ, and q̂ with its norm.
template <typename T>
struct Shape {
  T qhat[4], qnorm, rot[9], m[9], sigma[9];
};

template <typename T>
ALWAYS_INLINE Shape<T> make_shape(const T* quat, const T* scale) {
  Shape<T> s;
  const T norm = std::sqrt(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
  s.qnorm = norm;
  const T denom = norm >= T(kMinNorm) ? norm : T(kMinNorm);
  for (int i = 0; i < 4; ++i) s.qhat[i] = quat[i] / denom;
  const T w = s.qhat[0], x = s.qhat[1], y = s.qhat[2], z = s.qhat[3];
  const T r[9] = {T(1) - T(2) * (y * y + z * z), T(2) * (x * y - w * z), T(2) * (x * z + w * y),
                  T(2) * (x * y + w * z), T(1) - T(2) * (x * x + z * z), T(2) * (y * z - w * x),
                  T(2) * (x * z - w * y), T(2) * (y * z + w * x), T(1) - T(2) * (x * x + y * y)};
  for (int i = 0; i < 9; ++i) {
    s.rot[i] = r[i];
    s.m[i] = r[i] * scale[i % 3];
  }
  matmul3(s.m, s.m, s.sigma, false, true);
  return s;
}

// Everything the projection of one (camera, Gaussian) pair computes, kept for its backward.
template <typename T>
struct Pair {
  T p[3], safe_depth, u, v, tx, ty, jac[6], cov_camera[9], js[6], cov_a, cov_b, cov_c, a, c, det_raw, det;
  T ratio;  // det(Σ) / det(Σ + low-pass), before the clamp of "antialiased"'s compensation
  bool in_front;
};

template <typename T>
inline T clamp_range(T x, T lo, T hi) {
  return std::min(std::max(x, lo), hi);
}

// d clamp(x, lo, hi) / dx as torch.minimum(torch.maximum(x, lo), hi) has it: 1/2 on each tie.
template <typename T>
inline T clamp_range_slope(T x, T lo, T hi) {
  const T after_max = x > lo ? T(1) : (x == lo ? T(0.5) : T(0));
  const T mx = std::max(x, lo);
  const T after_min = mx < hi ? T(1) : (mx == hi ? T(0.5) : T(0));
  return after_max * after_min;
}

template <typename T>
ALWAYS_INLINE Pair<T> project_pair(const Camera<T>& cam, const T* mean, const Shape<T>& shape) {
  Pair<T> q;
  for (int r = 0; r < 3; ++r) {
    q.p[r] = cam.rot[3 * r] * mean[0] + cam.rot[3 * r + 1] * mean[1] + cam.rot[3 * r + 2] * mean[2] + cam.trans[r];
  }
  q.in_front = q.p[2] > T(kNearPlane);
  const T z = q.in_front ? q.p[2] : T(1);
  q.safe_depth = z;
  q.u = q.p[0] / z;
  q.v = q.p[1] / z;
  q.tx = z * clamp_range(q.u, -cam.lim_x_neg, cam.lim_x_pos);
  q.ty = z * clamp_range(q.v, -cam.lim_y_neg, cam.lim_y_pos);
  const T z2 = z * z;
  q.jac[0] = cam.fx / z;
  q.jac[1] = T(0);
  q.jac[2] = -cam.fx * q.tx / z2;
  q.jac[3] = T(0);
  q.jac[4] = cam.fy / z;
  q.jac[5] = -cam.fy * q.ty / z2;
  T tmp[9];
  matmul3(cam.rot, shape.sigma, tmp);
  matmul3(tmp, cam.rot, q.cov_camera, false, true);
  T* js = q.js;  // J Σc, 2x3
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      T sum = T(0);
      for (int k = 0; k < 3; ++k) sum += q.jac[3 * i + k] * q.cov_camera[3 * k + j];
      js[3 * i + j] = sum;
    }
  }
  T cov2d[4];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      T sum = T(0);
      for (int k = 0; k < 3; ++k) sum += js[3 * i + k] * q.jac[3 * j + k];
      cov2d[2 * i + j] = sum;
    }
  }
  q.cov_a = cov2d[0];
  q.cov_b = cov2d[1];
  q.cov_c = cov2d[3];
  q.a = q.cov_a + T(kLowPass);
  q.c = q.cov_c + T(kLowPass);
  q.det_raw = q.a * q.c - q.cov_b * q.cov_b;
  q.det = std::max(q.det_raw, T(kMinDet));
  q.ratio = (q.cov_a * q.cov_c - q.cov_b * q.cov_b) / q.det;
  return q;
}

// SH bases of degree <= 3 at the unit direction (x, y, z), in the order of sh.py; `count` of them.
template <typename T>
inline void sh_bases(int degree, T x, T y, T z, T* b) {
  b[0] = T(kC0);
  if (degree < 1) return;
  b[1] = -T(kC1) * y;
  b[2] = T(kC1) * z;
  b[3] = -T(kC1) * x;
  if (degree < 2) return;
  const T xx = x * x, yy = y * y, zz = z * z, xy = x * y, yz = y * z, xz = x * z;
  b[4] = T(kC2[0]) * xy;
  b[5] = T(kC2[1]) * yz;
  b[6] = T(kC2[2]) * (T(2) * zz - xx - yy);
  b[7] = T(kC2[3]) * xz;
  b[8] = T(kC2[4]) * (xx - yy);
  if (degree < 3) return;
  b[9] = T(kC3[0]) * y * (T(3) * xx - yy);
  b[10] = T(kC3[1]) * xy * z;
  b[11] = T(kC3[2]) * y * (T(4) * zz - xx - yy);
  b[12] = T(kC3[3]) * z * (T(2) * zz - T(3) * xx - T(3) * yy);
  b[13] = T(kC3[4]) * x * (T(4) * zz - xx - yy);
  b[14] = T(kC3[5]) * z * (xx - yy);
  b[15] = T(kC3[6]) * x * (xx - T(3) * yy);
}

// Adds Σ_k g[k] ∂b_k/∂(x, y, z) to grad[3].
template <typename T>
inline void sh_bases_backward(int degree, T x, T y, T z, const T* g, T* grad) {
  if (degree < 1) return;
  T gx = -T(kC1) * g[3], gy = -T(kC1) * g[1], gz = T(kC1) * g[2];
  if (degree >= 2) {
    gx += T(kC2[0]) * y * g[4] - T(2) * T(kC2[2]) * x * g[6] + T(kC2[3]) * z * g[7] + T(2) * T(kC2[4]) * x * g[8];
    gy += T(kC2[0]) * x * g[4] + T(kC2[1]) * z * g[5] - T(2) * T(kC2[2]) * y * g[6] - T(2) * T(kC2[4]) * y * g[8];
    gz += T(kC2[1]) * y * g[5] + T(4) * T(kC2[2]) * z * g[6] + T(kC2[3]) * x * g[7];
  }
  if (degree >= 3) {
    const T xx = x * x, yy = y * y, zz = z * z;
    gx += T(kC3[0]) * T(6) * x * y * g[9] + T(kC3[1]) * y * z * g[10] - T(kC3[2]) * T(2) * x * y * g[11] -
          T(kC3[3]) * T(6) * x * z * g[12] + T(kC3[4]) * (T(4) * zz - T(3) * xx - yy) * g[13] +
          T(kC3[5]) * T(2) * x * z * g[14] + T(kC3[6]) * T(3) * (xx - yy) * g[15];
    gy += T(kC3[0]) * T(3) * (xx - yy) * g[9] + T(kC3[1]) * x * z * g[10] +
          T(kC3[2]) * (T(4) * zz - xx - T(3) * yy) * g[11] - T(kC3[3]) * T(6) * y * z * g[12] -
          T(kC3[4]) * T(2) * x * y * g[13] - T(kC3[5]) * T(2) * y * z * g[14] - T(kC3[6]) * T(6) * x * y * g[15];
    gz += T(kC3[1]) * x * y * g[10] + T(kC3[2]) * T(8) * y * z * g[11] +
          T(kC3[3]) * (T(6) * zz - T(3) * xx - T(3) * yy) * g[12] + T(kC3[4]) * T(8) * x * z * g[13] +
          T(kC3[5]) * (xx - yy) * g[14];
  }
  grad[0] += gx;
  grad[1] += gy;
  grad[2] += gz;
}

// The unit direction from a camera centre to a mean, and the length it was divided by.
template <typename T>
struct Direction {
  T d[3], dir[3], norm;
};

template <typename T>
ALWAYS_INLINE Direction<T> view_direction(const Camera<T>& cam, const T* mean) {
  Direction<T> r;
  for (int i = 0; i < 3; ++i) r.d[i] = mean[i] - cam.center[i];
  r.norm = std::sqrt(r.d[0] * r.d[0] + r.d[1] * r.d[1] + r.d[2] * r.d[2]);
  const T denom = r.norm >= T(kMinNorm) ? r.norm : T(kMinNorm);
  for (int i = 0; i < 3; ++i) r.dir[i] = r.d[i] / denom;
  return r;
}

// Gradient of v / max(|v|, eps) with respect to v, given the gradient g of the unit vector û.
template <int D, typename T>
inline void normalize_backward(const T* unit, T norm, const T* g, T* out) {
  if (norm <= T(kMinNorm)) {  // the clamp is active (torch passes no gradient on its tie either)
    for (int i = 0; i < D; ++i) out[i] = g[i] / T(kMinNorm);
    return;
  }
  T dot = T(0);
  for (int i = 0; i < D; ++i) dot += unit[i] * g[i];
  for (int i = 0; i < D; ++i) out[i] = (g[i] - unit[i] * dot) / norm;
}

// The inputs of one Gaussian: its mean and its shape.
template <typename T>
struct Gaussian {
  const T* mean;
  Shape<T> shape;
};

// The SH coefficients come as two bands, sh0 [N, 1, 3] and shN [N, K - 1, 3] (the module's parameters), so
// no joined [N, K, 3] copy is ever made: a Gaussian's first `count` coefficients are gathered per Gaussian.
template <typename T>
struct Inputs {
  const T *means, *quats, *scales, *sh0, *shN;
  int64_t rest;  // K - 1
  Inputs(const torch::Tensor& m, const torch::Tensor& q, const torch::Tensor& s, const torch::Tensor& c0,
         const torch::Tensor& cN)
      : means(m.data_ptr<T>()), quats(q.data_ptr<T>()), scales(s.data_ptr<T>()), sh0(c0.data_ptr<T>()),
        shN(cN.numel() > 0 ? cN.data_ptr<T>() : nullptr), rest(cN.size(1)) {}
  Gaussian<T> operator[](int64_t n) const { return {means + 3 * n, make_shape(quats + 4 * n, scales + 3 * n)}; }
  // The first `count` coefficients [count, 3] of Gaussian n, into coef.
  void gather(int64_t n, int count, T* coef) const {
    for (int ch = 0; ch < 3; ++ch) coef[ch] = sh0[3 * n + ch];
    for (int i = 3; i < 3 * count; ++i) coef[i] = shN[n * rest * 3 + i - 3];
  }
};

// Σ_k b_k c_k + 0.5 per channel, before the clamp at 0.
template <typename T>
inline void shade_raw(const T* bases, const T* coef, int count, T* raw) {
  for (int ch = 0; ch < 3; ++ch) {
    T sum = T(0);
    for (int k = 0; k < count; ++k) sum += bases[k] * coef[3 * k + ch];
    raw[ch] = sum + T(0.5);
  }
}

struct Sizes {
  int64_t cameras, gaussians;
  int degree;
  bool antialiased;
};

template <typename T>
std::vector<torch::Tensor> forward_impl(const torch::Tensor& means, const torch::Tensor& quats,
                                        const torch::Tensor& scales, const torch::Tensor& sh0,
                                        const torch::Tensor& shN, const std::vector<Camera<T>>& cameras,
                                        const Sizes& z) {
  const auto opts = means.options();
  const int64_t C = z.cameras, N = z.gaussians;
  torch::Tensor means2d = torch::empty({C, N, 2}, opts);
  torch::Tensor conics = torch::empty({C, N, 3}, opts);
  torch::Tensor depths = torch::empty({C, N}, opts);
  torch::Tensor radii = torch::empty({C, N}, opts.dtype(torch::kInt32));
  torch::Tensor comps = z.antialiased ? torch::empty({C, N}, opts) : torch::empty({0}, opts);
  torch::Tensor colors = torch::empty({C, N, 3}, opts);
  const Inputs<T> in(means, quats, scales, sh0, shN);
  T* m2 = means2d.data_ptr<T>();
  T* co = conics.data_ptr<T>();
  T* de = depths.data_ptr<T>();
  int32_t* ra = radii.data_ptr<int32_t>();
  T* cm = z.antialiased ? comps.data_ptr<T>() : nullptr;
  T* rgb = colors.data_ptr<T>();
  const int count = (z.degree + 1) * (z.degree + 1);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    const auto [mean, shape] = in[n];
    T coef[48];
    in.gather(n, count, coef);
    for (int64_t ci = 0; ci < C; ++ci) {
      const Camera<T>& cam = cameras[ci];
      const Pair<T> q = project_pair(cam, mean, shape);
      const int64_t at = ci * N + n;
      const T mx = cam.fx * q.p[0] / q.safe_depth + cam.cx, my = cam.fy * q.p[1] / q.safe_depth + cam.cy;
      m2[2 * at] = mx;
      m2[2 * at + 1] = my;
      co[3 * at] = q.c / q.det;
      co[3 * at + 1] = -q.cov_b / q.det;
      co[3 * at + 2] = q.a / q.det;
      de[at] = q.p[2];
      if (cm) cm[at] = std::sqrt(std::max(q.ratio, T(0)));
      const T mid = T(0.5) * (q.a + q.c);
      const T lambda_max = mid + std::sqrt(std::max(mid * mid - q.det, T(0.1)));
      const T radius = std::ceil(T(3) * std::sqrt(lambda_max));
      const bool on_image = mx + radius > T(0) && mx - radius < cam.width && my + radius > T(0) &&
                            my - radius < cam.height;
      ra[at] = (q.in_front && on_image) ? int32_t(radius) : 0;

      const Direction<T> d = view_direction(cam, mean);
      T bases[16];
      sh_bases(z.degree, d.dir[0], d.dir[1], d.dir[2], bases);
      T raw[3];
      shade_raw(bases, coef, count, raw);
      for (int ch = 0; ch < 3; ++ch) rgb[3 * at + ch] = std::max(raw[ch], T(0));
    }
  }
  return {means2d, conics, depths, radii, comps, colors};
}

// Upstream gradient of one output, or nullptr when autograd passed none (zero).
template <typename T>
const T* maybe(const std::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? t->data_ptr<T>() : nullptr;
}

template <typename T>
std::vector<torch::Tensor> backward_impl(const torch::Tensor& means, const torch::Tensor& quats,
                                         const torch::Tensor& scales, const torch::Tensor& sh0,
                                         const torch::Tensor& shN, const std::vector<Camera<T>>& cameras,
                                         const Sizes& z,
                                         const T* g_means2d, const T* g_conics, const T* g_depths,
                                         const T* g_colors, const T* g_comps) {
  const int64_t C = z.cameras, N = z.gaussians, rest = shN.size(1);
  torch::Tensor grad_means = torch::zeros_like(means);
  torch::Tensor grad_quats = torch::zeros_like(quats);
  torch::Tensor grad_scales = torch::zeros_like(scales);
  torch::Tensor grad_sh0 = torch::zeros_like(sh0);
  torch::Tensor grad_shN = torch::zeros_like(shN);
  const Inputs<T> in(means, quats, scales, sh0, shN);
  T* gmp = grad_means.data_ptr<T>();
  T* gqp = grad_quats.data_ptr<T>();
  T* gsp = grad_scales.data_ptr<T>();
  T* g0p = grad_sh0.data_ptr<T>();
  T* gNp = grad_shN.numel() > 0 ? grad_shN.data_ptr<T>() : nullptr;
  const int count = (z.degree + 1) * (z.degree + 1);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t n = 0; n < N; ++n) {
    const auto [mean, shape] = in[n];
    T coef[48], g_coef[48] = {};
    in.gather(n, count, coef);
    T* g_mean = gmp + 3 * n;
    T g_sigma[9] = {};
    for (int64_t ci = 0; ci < C; ++ci) {
      const Camera<T>& cam = cameras[ci];
      const int64_t at = ci * N + n;
      // Colour: max(Σ b_k c_k + 0.5, 0) at the unit direction from the camera centre.
      if (g_colors) {
        const Direction<T> d = view_direction(cam, mean);
        T bases[16];
        sh_bases(z.degree, d.dir[0], d.dir[1], d.dir[2], bases);
        T raw[3], g_rgb[3];
        shade_raw(bases, coef, count, raw);
        for (int ch = 0; ch < 3; ++ch) g_rgb[ch] = raw[ch] > T(0) ? g_colors[3 * at + ch] : T(0);
        T g_bases[16];
        for (int k = 0; k < count; ++k) {
          g_bases[k] = T(0);
          for (int ch = 0; ch < 3; ++ch) {
            g_coef[3 * k + ch] += bases[k] * g_rgb[ch];
            g_bases[k] += g_rgb[ch] * coef[3 * k + ch];
          }
        }
        T g_dir[3] = {};
        sh_bases_backward(z.degree, d.dir[0], d.dir[1], d.dir[2], g_bases, g_dir);
        T g_d[3];
        normalize_backward<3>(d.dir, d.norm, g_dir, g_d);
        for (int i = 0; i < 3; ++i) g_mean[i] += g_d[i];
      }

      const Pair<T> q = project_pair(cam, mean, shape);
      const T zd = q.safe_depth, z2 = zd * zd;
      T g_p[3] = {T(0), T(0), g_depths ? g_depths[at] : T(0)};
      T g_z = T(0);  // gradient of the safe depth
      // means2d = (fx px / z + cx, fy py / z + cy)
      if (g_means2d) {
        const T gx = g_means2d[2 * at], gy = g_means2d[2 * at + 1];
        g_p[0] += gx * cam.fx / zd;
        g_p[1] += gy * cam.fy / zd;
        g_z -= (gx * cam.fx * q.p[0] + gy * cam.fy * q.p[1]) / z2;
      }
      // conics (c, -b, a) / det and compensation sqrt(max(ratio, 0)), ratio = det_unfiltered / det.
      T g_a = T(0), g_b = T(0), g_c = T(0), g_det = T(0), g_cov_a = T(0), g_cov_c = T(0);
      if (g_conics) {
        const T g0 = g_conics[3 * at], g1 = g_conics[3 * at + 1], g2 = g_conics[3 * at + 2];
        g_c += g0 / q.det;
        g_b -= g1 / q.det;
        g_a += g2 / q.det;
        g_det -= (g0 * q.c - g1 * q.cov_b + g2 * q.a) / (q.det * q.det);
      }
      if (g_comps && q.ratio > T(0)) {
        const T g_ratio = g_comps[at] / (T(2) * std::sqrt(q.ratio));
        const T g_unfiltered = g_ratio / q.det;
        g_det -= g_ratio * q.ratio / q.det;
        g_cov_a += g_unfiltered * q.cov_c;
        g_cov_c += g_unfiltered * q.cov_a;
        g_b -= T(2) * q.cov_b * g_unfiltered;
      }
      if (q.det_raw > T(kMinDet)) {
        g_a += g_det * q.c;
        g_c += g_det * q.a;
        g_b -= T(2) * q.cov_b * g_det;
      }
      g_cov_a += g_a;
      g_cov_c += g_c;
      // cov2d = (J Σc) Jᵀ; only its (0,0), (0,1) and (1,1) entries are read.
      const T g2d[4] = {g_cov_a, g_b, T(0), g_cov_c};
      T gj_js[6];  // G J: the gradient of J Σc
      for (int i = 0; i < 2; ++i) {
        for (int k = 0; k < 3; ++k) gj_js[3 * i + k] = g2d[2 * i] * q.jac[k] + g2d[2 * i + 1] * q.jac[3 + k];
      }
      const T* js = q.js;
      T g_jac[6];  // Gᵀ (J Σc) + (G J) Σcᵀ
      for (int i = 0; i < 2; ++i) {
        for (int k = 0; k < 3; ++k) {
          T sum = g2d[i] * js[k] + g2d[2 + i] * js[3 + k];
          for (int j = 0; j < 3; ++j) sum += gj_js[3 * i + j] * q.cov_camera[3 * k + j];
          g_jac[3 * i + k] = sum;
        }
      }
      T g_cov_camera[9];  // Jᵀ (G J)
      for (int k = 0; k < 3; ++k) {
        for (int j = 0; j < 3; ++j) g_cov_camera[3 * k + j] = q.jac[k] * gj_js[j] + q.jac[3 + k] * gj_js[3 + j];
      }
      T tmp[9], g_world[9];  // Rᵀ gΣc R
      matmul3(cam.rot, g_cov_camera, tmp, true, false);
      matmul3(tmp, cam.rot, g_world);
      for (int i = 0; i < 9; ++i) g_sigma[i] += g_world[i];
      // J = [[fx/z, 0, -fx tx/z²], [0, fy/z, -fy ty/z²]]
      g_z -= (g_jac[0] * cam.fx + g_jac[4] * cam.fy) / z2;
      g_z += T(2) * (g_jac[2] * cam.fx * q.tx + g_jac[5] * cam.fy * q.ty) / (z2 * zd);
      const T g_tx = -g_jac[2] * cam.fx / z2, g_ty = -g_jac[5] * cam.fy / z2;
      // t = z clamp(p / z, -lim_neg, lim_pos)
      const T clamped_x = clamp_range(q.u, -cam.lim_x_neg, cam.lim_x_pos);
      const T clamped_y = clamp_range(q.v, -cam.lim_y_neg, cam.lim_y_pos);
      g_z += g_tx * clamped_x + g_ty * clamped_y;
      const T g_u = g_tx * zd * clamp_range_slope(q.u, -cam.lim_x_neg, cam.lim_x_pos);
      const T g_v = g_ty * zd * clamp_range_slope(q.v, -cam.lim_y_neg, cam.lim_y_pos);
      g_p[0] += g_u / zd;
      g_p[1] += g_v / zd;
      g_z -= (g_u * q.p[0] + g_v * q.p[1]) / z2;
      if (q.in_front) g_p[2] += g_z;
      for (int i = 0; i < 3; ++i) {
        g_mean[i] += cam.rot[i] * g_p[0] + cam.rot[3 + i] * g_p[1] + cam.rot[6 + i] * g_p[2];
      }
    }
    // Σ = M Mᵀ with M = R(q̂) diag(s): gM = (gΣ + gΣᵀ) M.
    T g_m[9];
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        T sum = T(0);
        for (int k = 0; k < 3; ++k) sum += (g_sigma[3 * i + k] + g_sigma[3 * k + i]) * shape.m[3 * k + j];
        g_m[3 * i + j] = sum;
      }
    }
    T g_rot[9];
    for (int i = 0; i < 9; ++i) g_rot[i] = g_m[i] * in.scales[3 * n + i % 3];
    for (int j = 0; j < 3; ++j) {
      gsp[3 * n + j] = g_m[j] * shape.rot[j] + g_m[3 + j] * shape.rot[3 + j] + g_m[6 + j] * shape.rot[6 + j];
    }
    const T w = shape.qhat[0], x = shape.qhat[1], y = shape.qhat[2], zq = shape.qhat[3];
    const T* g = g_rot;
    const T g_qhat[4] = {
        T(2) * (-zq * g[1] + y * g[2] + zq * g[3] - x * g[5] - y * g[6] + x * g[7]),
        T(2) * (y * g[1] + zq * g[2] + y * g[3] - T(2) * x * g[4] - w * g[5] + zq * g[6] + w * g[7] - T(2) * x * g[8]),
        T(2) * (-T(2) * y * g[0] + x * g[1] + w * g[2] + x * g[3] + zq * g[5] - w * g[6] + zq * g[7] - T(2) * y * g[8]),
        T(2) * (-T(2) * zq * g[0] - w * g[1] + x * g[2] + w * g[3] - T(2) * zq * g[4] + y * g[5] + x * g[6] + y * g[7]),
    };
    normalize_backward<4>(shape.qhat, shape.qnorm, g_qhat, gqp + 4 * n);
    for (int ch = 0; ch < 3; ++ch) g0p[3 * n + ch] = g_coef[ch];
    for (int i = 3; i < 3 * count; ++i) gNp[n * rest * 3 + i - 3] = g_coef[i];
  }
  return {grad_means, grad_quats, grad_scales, grad_sh0, grad_shN};
}

Sizes check_inputs(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
                   const torch::Tensor& sh0, const torch::Tensor& shN, const torch::Tensor& viewmats,
                   const torch::Tensor& intrinsics,
                   const torch::Tensor& centers, int64_t degree, bool antialiased) {
  const auto dtype = means.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kFloat64, "fused projection: float32 or float64 only");
  for (const auto* t : {&means, &quats, &scales, &sh0, &shN, &viewmats, &intrinsics, &centers}) {
    TORCH_CHECK(t->device().is_cpu(), "fused projection: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == dtype, "fused projection: all tensors must share one dtype");
    TORCH_CHECK(t->is_contiguous(), "fused projection: tensors must be contiguous");
  }
  const int64_t N = means.size(0), C = viewmats.size(0);
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "fused projection: means must be [N, 3]");
  TORCH_CHECK(quats.dim() == 2 && quats.size(0) == N && quats.size(1) == 4, "fused projection: quats must be [N, 4]");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == 3,
              "fused projection: scales must be [N, 3]");
  TORCH_CHECK(0 <= degree && degree <= 3, "fused projection: SH degree must be in 0..3, got ", degree);
  TORCH_CHECK(sh0.dim() == 3 && sh0.size(0) == N && sh0.size(1) == 1 && sh0.size(2) == 3,
              "fused projection: sh0 must be [N, 1, 3], got ", sh0.sizes());
  TORCH_CHECK(shN.dim() == 3 && shN.size(0) == N && shN.size(2) == 3 && shN.size(1) + 1 >= (degree + 1) * (degree + 1),
              "fused projection: shN must be [N, K - 1 >= (degree+1)^2 - 1, 3], got ", shN.sizes());
  TORCH_CHECK(viewmats.dim() == 3 && viewmats.size(1) == 4 && viewmats.size(2) == 4,
              "fused projection: world_to_camera must be [C, 4, 4]");
  TORCH_CHECK(intrinsics.dim() == 3 && intrinsics.size(0) == C && intrinsics.size(1) == 3 && intrinsics.size(2) == 3,
              "fused projection: intrinsics must be [C, 3, 3]");
  TORCH_CHECK(centers.dim() == 2 && centers.size(0) == C && centers.size(1) == 3,
              "fused projection: centers must be [C, 3]");
  return Sizes{C, N, int(degree), antialiased};
}

std::vector<torch::Tensor> forward(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
                                   const torch::Tensor& sh0, const torch::Tensor& shN, const torch::Tensor& viewmats,
                                   const torch::Tensor& intrinsics, const torch::Tensor& centers, int64_t width,
                                   int64_t height, int64_t degree, bool antialiased) {
  const Sizes z = check_inputs(means, quats, scales, sh0, shN, viewmats, intrinsics, centers, degree, antialiased);
  if (means.scalar_type() == torch::kFloat64) {
    const auto cams = read_cameras<double>(viewmats, intrinsics, centers, width, height);
    return forward_impl<double>(means, quats, scales, sh0, shN, cams, z);
  }
  const auto cams = read_cameras<float>(viewmats, intrinsics, centers, width, height);
  return forward_impl<float>(means, quats, scales, sh0, shN, cams, z);
}

std::vector<torch::Tensor> backward(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
                                    const torch::Tensor& sh0, const torch::Tensor& shN, const torch::Tensor& viewmats,
                                    const torch::Tensor& intrinsics, const torch::Tensor& centers, int64_t width,
                                    int64_t height, int64_t degree, bool antialiased,
                                    const std::optional<torch::Tensor>& g_means2d,
                                    const std::optional<torch::Tensor>& g_conics,
                                    const std::optional<torch::Tensor>& g_depths,
                                    const std::optional<torch::Tensor>& g_comps,
                                    const std::optional<torch::Tensor>& g_colors) {
  const Sizes z = check_inputs(means, quats, scales, sh0, shN, viewmats, intrinsics, centers, degree, antialiased);
  const int64_t pairs = z.cameras * z.gaussians;
  const std::vector<std::pair<const std::optional<torch::Tensor>*, int64_t>> grads = {
      {&g_means2d, 2 * pairs}, {&g_conics, 3 * pairs}, {&g_depths, pairs}, {&g_comps, pairs}, {&g_colors, 3 * pairs}};
  for (const auto& [g, size] : grads) {
    if (g->has_value() && (*g)->defined()) {
      TORCH_CHECK((*g)->is_contiguous() && (*g)->scalar_type() == means.scalar_type() && (*g)->numel() == size,
                  "fused projection: an upstream gradient has the wrong size, dtype or layout");
    }
  }
  if (means.scalar_type() == torch::kFloat64) {
    const auto cams = read_cameras<double>(viewmats, intrinsics, centers, width, height);
    return backward_impl<double>(means, quats, scales, sh0, shN, cams, z, maybe<double>(g_means2d),
                                 maybe<double>(g_conics), maybe<double>(g_depths), maybe<double>(g_colors),
                                 antialiased ? maybe<double>(g_comps) : nullptr);
  }
  const auto cams = read_cameras<float>(viewmats, intrinsics, centers, width, height);
  return backward_impl<float>(means, quats, scales, sh0, shN, cams, z, maybe<float>(g_means2d),
                              maybe<float>(g_conics), maybe<float>(g_depths), maybe<float>(g_colors),
                              antialiased ? maybe<float>(g_comps) : nullptr);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward,
        "means2d, conics, depths, radii, compensations (empty unless antialiased) and colours of every pair");
  m.def("backward", &backward,
        "gradients of means, quats, scales, sh0 and shN from the outputs' gradients (None = zero)");
}

// Fused 3DGS photometric loss (1-w)·L1 + w·(1-SSIM) of a row strip on the CPU: the loss and its gradient
// in one call, so autograd's backward only scales the saved gradient by the upstream scalar.
//
// Follows lightning_grendel/splatting/losses.py (ssim_map, the reference): an 11x11 Gaussian window
// applied as two 11-tap passes (vertical, then horizontal) with zero padding at the strip's edges. Images
// are [rows, width, channels] (channels interleaved), so a vertical pass is a sum of whole contiguous rows
// and a horizontal pass is a 1D filter over the flat row with taps `channels` apart: both are unit-stride
// loops the compiler vectorises. Each output row is computed by one thread from the input rows around it
// (no image-sized intermediates in the forward); the loss is summed per row, then over rows in order, and
// every gradient value is computed by exactly one thread, so results are bit-identical for any thread count.
//
// Gradient of SSIM = A1·A2 / (B1·B2) with respect to the blurred moments mx, m2x = G*(x²), mxy = G*(xy):
//   dS/dmx  = 2/(B1·B2) · (my·(A2 - A1) + mx·S·(B1 - B2)),  dS/dm2x = -S/B2,  dS/dmxy = 2·A1/(B1·B2),
// and dL/dx = G*(dL/dmx) + 2x·G*(dL/dm2x) + y·G*(dL/dmxy) (the window is symmetric, so its adjoint is itself).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kTaps = 11;
constexpr int kHalo = kTaps / 2;

template <typename T>
struct Setup {
  int64_t rows, width, channels, own_start, own_end;
  T taps[kTaps];
  T c1, c2;
  int64_t n() const { return width * channels; }
  int64_t pad() const { return kHalo * channels; }
};

// out[j] = sum_k taps[k] * in[j + (k - kHalo) * stride]: `in` is a row with pad() zeros on both sides.
template <typename T>
inline void horizontal(const T* __restrict in, T* __restrict out, int64_t n, int64_t stride, const T* taps) {
  const T t0 = taps[0];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = t0 * in[j];
  for (int k = 1; k < kTaps; ++k) {
    const T t = taps[k];
    const T* __restrict src = in + k * stride;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += t * src[j];
  }
}

// Per-thread row buffers: `count` padded rows for the vertical sums and `count` plain rows for the outputs.
template <typename T>
struct RowBuffers {
  std::vector<T> padded, out;
  int64_t n, pad;
  RowBuffers(int count, int64_t n_, int64_t pad_)
      : padded(count * (n_ + 2 * pad_), T(0)), out(count * n_), n(n_), pad(pad_) {}
  T* vertical(int q) { return padded.data() + q * (n + 2 * pad) + pad; }
  T* result(int q) { return out.data() + q * n; }
  void filter(int count, int64_t stride, const T* taps) {
    for (int q = 0; q < count; ++q) horizontal(vertical(q) - pad, result(q), n, stride, taps);
  }
};

// Blurred x, y, x², y², xy of row i (all rows of the strip are inputs).
template <typename T>
void blur_moments(const Setup<T>& s, const T* x, const T* y, int64_t i, RowBuffers<T>& buf) {
  const int64_t n = s.n();
  T* vx = buf.vertical(0);
  T* vy = buf.vertical(1);
  T* vxx = buf.vertical(2);
  T* vyy = buf.vertical(3);
  T* vxy = buf.vertical(4);
  std::fill(vx, vx + n, T(0));
  std::fill(vy, vy + n, T(0));
  std::fill(vxx, vxx + n, T(0));
  std::fill(vyy, vyy + n, T(0));
  std::fill(vxy, vxy + n, T(0));
  for (int64_t r = std::max<int64_t>(0, i - kHalo); r <= std::min(s.rows - 1, i + kHalo); ++r) {
    const T t = s.taps[r - i + kHalo];
    const T* __restrict xr = x + r * n;
    const T* __restrict yr = y + r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T a = xr[j], b = yr[j];
      vx[j] += t * a;
      vy[j] += t * b;
      vxx[j] += t * (a * a);
      vyy[j] += t * (b * b);
      vxy[j] += t * (a * b);
    }
  }
  buf.filter(5, s.channels, s.taps);
}

// SSIM of one row from its blurred moments: the row's sums of |x - y| and 1 - SSIM, and (kCoef) the
// coefficient maps' entries, `plane` apart.
template <typename T, bool kCoef>
inline void ssim_row(RowBuffers<T>& buf, const T* __restrict xr, const T* __restrict yr, int64_t n, T c1, T c2,
                     T k, T* __restrict base, int64_t plane, double* l1_sum, double* dssim_sum) {
  const T* __restrict mxs = buf.result(0);
  const T* __restrict mys = buf.result(1);
  const T* __restrict exx = buf.result(2);
  const T* __restrict eyy = buf.result(3);
  const T* __restrict exy = buf.result(4);
  double l1 = 0.0, dssim = 0.0;
#pragma omp simd reduction(+ : l1, dssim)
  for (int64_t j = 0; j < n; ++j) {
    const T mx = mxs[j], my = mys[j];
    const T var_x = exx[j] - mx * mx, var_y = eyy[j] - my * my, cov = exy[j] - mx * my;
    const T a1 = T(2) * mx * my + c1, a2 = T(2) * cov + c2;
    const T b1 = mx * mx + my * my + c1, b2 = var_x + var_y + c2;
    const T d = b1 * b2;
    const T ssim = (a1 * a2) / d;
    dssim += double(T(1) - ssim);
    const T diff = xr[j] - yr[j];
    l1 += double(diff < T(0) ? -diff : diff);
    if constexpr (kCoef) {
      const T scale = T(2) * k / d, spread = ssim * (b1 - b2);
      base[j] = scale * (my * (a2 - a1) + mx * spread);
      base[plane + j] = scale * (mx * (a2 - a1) + my * spread);
      base[2 * plane + j] = -k * ssim / b2;
      base[3 * plane + j] = scale * a1;
    }
  }
  *l1_sum = l1;
  *dssim_sum = dssim;
}

// Forward over the owned rows: per-row sums of |x - y| and 1 - SSIM, and (if `coef`) the four maps
// dL/dmx, dL/dmy, dL/dm2x (= dL/dm2y), dL/dmxy for L = ssim_scale · sum(1 - SSIM).
template <typename T>
void forward_rows(const Setup<T>& s, const T* x, const T* y, double* l1_rows, double* dssim_rows, T* coef,
                  T ssim_scale, int threads) {
  const int64_t n = s.n(), own = s.own_end - s.own_start, plane = own * n;
  const T c1 = s.c1, c2 = s.c2, k = -ssim_scale;  // dL/dSSIM
#pragma omp parallel num_threads(threads)
  {
    RowBuffers<T> buf(5, n, s.pad());
#pragma omp for schedule(static)
    for (int64_t i = s.own_start; i < s.own_end; ++i) {
      blur_moments(s, x, y, i, buf);
      double* const sums_l1 = l1_rows + (i - s.own_start);
      double* const sums_dssim = dssim_rows + (i - s.own_start);
      const T* xr = x + i * n;
      const T* yr = y + i * n;
      if (coef) {
        ssim_row<T, true>(buf, xr, yr, n, c1, c2, k, coef + (i - s.own_start) * n, plane, sums_l1, sums_dssim);
      } else {
        ssim_row<T, false>(buf, xr, yr, n, c1, c2, k, nullptr, plane, sums_l1, sums_dssim);
      }
    }
  }
}

// dL/d(self) of one row, for self = x (other = y) or self = y (other = x): SSIM is symmetric in its two
// images, so both gradients have one form; the L1 term's sign follows self - other.
template <typename T>
inline void input_gradient(const T* __restrict g_mean, const T* __restrict g_square, const T* __restrict g_cross,
                           const T* __restrict self, const T* __restrict other, T l1, T* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T a = self[j], b = other[j];
    const T sign = T(a > b) - T(a < b);
    out[j] = g_mean[j] + T(2) * a * g_square[j] + b * g_cross[j] + l1 * sign;
  }
}

// Gradient rows [own_start - halo, own_end + halo) of the strip from the coefficient maps, plus the L1 term.
template <typename T>
void gradient_rows(const Setup<T>& s, const T* x, const T* y, const T* coef, T l1_scale, T* grad_x, T* grad_y,
                   int threads) {
  const int64_t n = s.n(), plane = (s.own_end - s.own_start) * n;
  const int64_t lo = std::max<int64_t>(0, s.own_start - kHalo), hi = std::min(s.rows, s.own_end + kHalo);
#pragma omp parallel num_threads(threads)
  {
    RowBuffers<T> buf(4, n, s.pad());
#pragma omp for schedule(static)
    for (int64_t i = lo; i < hi; ++i) {
      for (int q = 0; q < 4; ++q) std::fill(buf.vertical(q), buf.vertical(q) + n, T(0));
      for (int64_t r = std::max(s.own_start, i - kHalo); r <= std::min(s.own_end - 1, i + kHalo); ++r) {
        const T t = s.taps[r - i + kHalo];
        for (int q = 0; q < 4; ++q) {
          const T* __restrict src = coef + q * plane + (r - s.own_start) * n;
          T* __restrict dst = buf.vertical(q);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dst[j] += t * src[j];
        }
      }
      buf.filter(4, s.channels, s.taps);
      const T* __restrict gmx = buf.result(0);
      const T* __restrict gmy = buf.result(1);
      const T* __restrict gm2 = buf.result(2);
      const T* __restrict gxy = buf.result(3);
      const T* __restrict xr = x + i * n;
      const T* __restrict yr = y + i * n;
      const T l1 = (i >= s.own_start && i < s.own_end) ? l1_scale : T(0);
      if (grad_x) input_gradient(gmx, gm2, gxy, xr, yr, l1, grad_x + i * n, n);
      if (grad_y) input_gradient(gmy, gm2, gxy, yr, xr, l1, grad_y + i * n, n);
    }
  }
}

template <typename T>
std::vector<torch::Tensor> run(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& taps,
                               double c1, double c2, int64_t own_start, int64_t own_end, double l1_scale,
                               double ssim_scale, bool want_grad_x, bool want_grad_y) {
  Setup<T> s{x.size(0), x.size(1), x.size(2), own_start, own_end, {}, T(c1), T(c2)};
  const auto taps64 = taps.accessor<double, 1>();
  for (int k = 0; k < kTaps; ++k) s.taps[k] = T(taps64[k]);
  const int threads = at::get_num_threads();
  const int64_t own = own_end - own_start, n = s.n();
  const bool want_grad = want_grad_x || want_grad_y;
  std::vector<double> l1_rows(own), dssim_rows(own);
  torch::Tensor coef = want_grad ? torch::empty({4, own, n}, x.options()) : torch::Tensor();
  forward_rows<T>(s, x.data_ptr<T>(), y.data_ptr<T>(), l1_rows.data(), dssim_rows.data(),
                  want_grad ? coef.data_ptr<T>() : nullptr, T(ssim_scale), threads);
  double l1 = 0.0, dssim = 0.0;
  for (int64_t r = 0; r < own; ++r) {  // fixed order: the same sum for any thread count
    l1 += l1_rows[r];
    dssim += dssim_rows[r];
  }
  torch::Tensor loss = torch::full({}, l1_scale * l1 + ssim_scale * dssim, x.options());
  torch::Tensor grad_x = want_grad_x ? torch::zeros_like(x) : torch::Tensor();
  torch::Tensor grad_y = want_grad_y ? torch::zeros_like(y) : torch::Tensor();
  if (want_grad && own > 0) {
    gradient_rows<T>(s, x.data_ptr<T>(), y.data_ptr<T>(), coef.data_ptr<T>(), T(l1_scale),
                     want_grad_x ? grad_x.data_ptr<T>() : nullptr, want_grad_y ? grad_y.data_ptr<T>() : nullptr,
                     threads);
  }
  return {loss, grad_x, grad_y};
}

std::vector<torch::Tensor> loss_and_grad(const torch::Tensor& image, const torch::Tensor& target,
                                         const torch::Tensor& taps, double c1, double c2, int64_t own_start,
                                         int64_t own_end, double l1_scale, double ssim_scale, bool grad_image,
                                         bool grad_target) {
  TORCH_CHECK(image.dim() == 3 && image.sizes() == target.sizes(),
              "fused SSIM: image and target must both be [rows, width, channels], got ", image.sizes(), " and ",
              target.sizes());
  TORCH_CHECK(image.device().is_cpu() && target.device().is_cpu(), "fused SSIM: tensors must be on the CPU");
  TORCH_CHECK(image.scalar_type() == target.scalar_type(), "fused SSIM: image and target dtypes differ");
  TORCH_CHECK(image.is_contiguous() && target.is_contiguous(), "fused SSIM: tensors must be contiguous");
  TORCH_CHECK(taps.dim() == 1 && taps.numel() == kTaps && taps.scalar_type() == torch::kFloat64,
              "fused SSIM: the window must be 11 float64 taps");
  TORCH_CHECK(0 <= own_start && own_start <= own_end && own_end <= image.size(0),
              "fused SSIM: owned rows [", own_start, ", ", own_end, ") outside the strip's ", image.size(0), " rows");
  const auto taps_cpu = taps.contiguous().cpu();
  if (image.scalar_type() == torch::kFloat64) {
    return run<double>(image, target, taps_cpu, c1, c2, own_start, own_end, l1_scale, ssim_scale, grad_image,
                       grad_target);
  }
  TORCH_CHECK(image.scalar_type() == torch::kFloat32, "fused SSIM: float32 or float64 images only");
  return run<float>(image, target, taps_cpu, c1, c2, own_start, own_end, l1_scale, ssim_scale, grad_image,
                    grad_target);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("loss_and_grad", &loss_and_grad,
        "L1 + D-SSIM loss of rows [own_start, own_end) of a strip, and its gradients (empty when not asked)");
}

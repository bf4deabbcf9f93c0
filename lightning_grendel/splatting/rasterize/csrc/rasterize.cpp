// Tile-based 3DGS rasterizer for one image on the CPU: binning, depth sort, alpha compositing and its
// backward. Follows lightning_grendel/splatting/rasterize_torch.py (the reference) operation by operation
// so that both backends agree to rounding: float32 tile bounds, stable depth order, transmittance
// accumulated in double (as torch's CPU cumprod does), alpha = min(0.99, o * exp(-sigma)).
//
// Parallel over 16x16 tiles with OpenMP. The backward pass writes one gradient record per (tile, splat)
// intersection and reduces them per splat in intersection order, so gradients are bit-identical for any
// thread count and schedule.

#include <torch/extension.h>

#include "checks.h"
#include "common.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace {

using namespace lgr_raster;

constexpr int kSplatGrads = 6;  // mean x, mean y, conic a, b, c, opacity; colour grads follow

// ---------------------------------------------------------------------------------------------------
// Binning: the float32 tile rectangle of tiles.tile_bounds, then splat ids per tile in stable depth order.

struct TileLists {
  torch::Tensor offsets_tensor, ids_tensor;
  const int64_t* offsets;  // [num_tiles + 1]
  const int32_t* ids;      // [intersections], tile-major, depth-sorted inside a tile
  int64_t size;            // number of intersections

  TileLists(torch::Tensor offsets_in, torch::Tensor ids_in)
      : offsets_tensor(std::move(offsets_in)), ids_tensor(std::move(ids_in)),
        offsets(offsets_tensor.data_ptr<int64_t>()), ids(ids_tensor.data_ptr<int32_t>()), size(ids_tensor.numel()) {}
};

template <typename scalar_t>
TileLists bin_splats(const scalar_t* means, const float* radii, const double* depths, int64_t n, const Grid& g) {
  std::vector<TileBox> rects(n);
  const int32_t r0 = static_cast<int32_t>(g.tile_row_start);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < n; ++i) {
    const float mx = static_cast<float>(means[2 * i]), my = static_cast<float>(means[2 * i + 1]);
    rects[i] = tile_box(mx, my, radii[i], g);
  }

  std::vector<std::pair<uint64_t, int32_t>> order;
  for (int64_t i = 0; i < n; ++i) {
    const TileBox& r = rects[i];
    if (r.x1 > r.x0 && r.y1 > r.y0) order.emplace_back(depth_key(depths[i]), static_cast<int32_t>(i));
  }
  std::sort(order.begin(), order.end());  // (depth, index): the stable depth sort of the reference

  const int64_t num_tiles = g.num_tiles();
  auto offsets = torch::zeros({num_tiles + 1}, torch::kInt64);
  int64_t* off = offsets.data_ptr<int64_t>();
  for (const auto& entry : order) {
    const TileBox& r = rects[entry.second];
    for (int32_t y = r.y0; y < r.y1; ++y) {
      int64_t* row = off + 1 + (y - r0) * g.tiles_x;
      for (int32_t x = r.x0; x < r.x1; ++x) ++row[x];
    }
  }
  for (int64_t t = 0; t < num_tiles; ++t) off[t + 1] += off[t];
  auto ids = torch::empty({off[num_tiles]}, torch::kInt32);
  int32_t* id = ids.data_ptr<int32_t>();
  std::vector<int64_t> cursor(off, off + num_tiles);
  for (const auto& entry : order) {
    const TileBox& r = rects[entry.second];
    for (int32_t y = r.y0; y < r.y1; ++y) {
      int64_t* row = cursor.data() + (y - r0) * g.tiles_x;
      for (int32_t x = r.x0; x < r.x1; ++x) id[row[x]++] = entry.second;
    }
  }
  return TileLists(offsets, ids);
}



// Calls visit(x, y) for each pixel for_each_span reports.
template <typename scalar_t, typename Visit>
inline void for_each_pixel(const Splat<scalar_t>& s, const TileRect& r, const uint32_t* live, Visit&& visit) {
  for_each_span(s, r, live, [&](int64_t y, uint32_t bits) {
    for (; bits; bits &= bits - 1) visit(r.ox + __builtin_ctz(bits), y);
  });
}

// The reference's per-pixel test. Returns false where the splat is skipped at this pixel.
template <typename scalar_t>
struct Sample {
  scalar_t dx, dy, vis, raw, alpha;

  inline bool eval(const Splat<scalar_t>& s, int64_t x, int64_t y) {
    dx = (static_cast<scalar_t>(x) + static_cast<scalar_t>(0.5)) - s.mx;
    dy = (static_cast<scalar_t>(y) + static_cast<scalar_t>(0.5)) - s.my;
    const scalar_t sigma = static_cast<scalar_t>(0.5) * (s.a * dx * dx + s.c * dy * dy) + s.b * dx * dy;
    if (!(sigma >= 0) || static_cast<double>(sigma) > s.cut) return false;
    vis = std::exp(-sigma);
    raw = s.o * vis;
    alpha = raw > kMaxAlpha<scalar_t> ? kMaxAlpha<scalar_t> : raw;
    return alpha >= kMinAlpha<scalar_t>;
  }
};

// Channel count known at compile time for the common case (RGB), at run time otherwise.
template <int Static>
struct Channels {
  int64_t runtime;
  constexpr int64_t get() const { return Static > 0 ? Static : runtime; }
};

// Per-splat colour-gradient accumulator: a register-friendly array when D is static.
template <int Static>
struct ColorSums {
  std::array<double, Static> sums;
  explicit ColorSums(int64_t) {}
  void reset() { sums.fill(0.0); }
  double* data() { return sums.data(); }
};

template <>
struct ColorSums<0> {
  std::vector<double> sums;
  explicit ColorSums(int64_t channels) : sums(channels) {}
  void reset() { std::fill(sums.begin(), sums.end(), 0.0); }
  double* data() { return sums.data(); }
};

// ---------------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, int StaticD>
void forward_tiles(const Grid& g, const TileLists& lists, const std::vector<Splat<scalar_t>>& splats,
                   const scalar_t* colors, const scalar_t* background, Channels<StaticD> channels, scalar_t* image,
                   scalar_t* final_t, int32_t* last, int64_t* blended) {
  const int64_t D = channels.get();
  const int64_t num_tiles = g.num_tiles();
  int64_t total_blended = 0;
#pragma omp parallel num_threads(at::get_num_threads()) reduction(+ : total_blended)
  {
    std::vector<double> trans(kTilePixels), color(kTilePixels * D);
    std::vector<int32_t> last_local(kTilePixels);
    uint32_t live[kTile];
    SplatWindow<scalar_t> window(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const TileRect r(g, tile);
      const int64_t active = r.count();
      if (active == 0) continue;
      std::fill(trans.begin(), trans.end(), 1.0);
      std::fill(color.begin(), color.end(), 0.0);
      std::fill(last_local.begin(), last_local.end(), -1);
      std::fill(live, live + kTile, 0u);
      for (int64_t y = r.y0; y < r.y1; ++y) live[y - r.oy] = span_bits(r.x0, r.x1, r.ox);
      int64_t finished = 0;
      const int64_t begin = lists.offsets[tile], count = lists.offsets[tile + 1] - begin;
      for (int64_t k = 0; k < count && finished < active; ++k) {
        if (k % kWindow == 0) window.load(lists.ids + begin, k, std::min(count, k + kWindow), splats.data(), colors);
        const Splat<scalar_t>& s = window.splat(k);
        if (s.cut < 0.0) continue;
        const scalar_t* col = window.color(k);
        for_each_pixel(s, r, live, [&](int64_t x, int64_t y) {
          const int p = r.local(x, y);
          Sample<scalar_t> px;
          if (!px.eval(s, x, y)) return;
          const scalar_t one_minus = static_cast<scalar_t>(1) - px.alpha;
          const double next = trans[p] * static_cast<double>(one_minus);
          if (static_cast<scalar_t>(next) < kMinTransmittance<scalar_t>) {
            live[y - r.oy] &= ~(uint32_t{1} << (x - r.ox));
            ++finished;
            return;
          }
          const double weight = static_cast<double>(px.alpha * static_cast<scalar_t>(trans[p]));
          double* c = color.data() + p * D;
          for (int64_t d = 0; d < D; ++d) c[d] += weight * static_cast<double>(col[d]);
          trans[p] = next;
          last_local[p] = static_cast<int32_t>(k);
          ++total_blended;
        });
      }
      for (int64_t y = r.y0; y < r.y1; ++y) {
        for (int64_t x = r.x0; x < r.x1; ++x) {
          const int p = r.local(x, y);
          const int64_t out = (y - g.row_start) * g.width + x;
          const scalar_t t = static_cast<scalar_t>(trans[p]);
          for (int64_t d = 0; d < D; ++d)
            image[out * D + d] = static_cast<scalar_t>(color[p * D + d]) + t * background[d];
          final_t[out] = t;
          last[out] = last_local[p];
        }
      }
    }
  }
  *blended = total_blended;
}

// ---------------------------------------------------------------------------------------------------
// Backward: each tile's list back to front from the saved final transmittance and last contributor.

template <typename scalar_t, int StaticD>
void backward_tiles(const Grid& g, const TileLists& lists, const std::vector<Splat<scalar_t>>& splats,
                    const scalar_t* colors, const scalar_t* background, Channels<StaticD> channels,
                    const scalar_t* final_t, const int32_t* last, const scalar_t* grad_image, scalar_t* records) {
  const int64_t D = channels.get();
  const int64_t K = kSplatGrads + D;
  const int64_t num_tiles = g.num_tiles();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<double> trans(kTilePixels), behind(kTilePixels * D), upstream(kTilePixels * D);
    ColorSums<StaticD> color_sums(D);
    SplatWindow<scalar_t> window(D);
    uint32_t live[kTile];
    std::vector<std::pair<int32_t, int>> by_last;  // (last contributor, local pixel), deepest first
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const TileRect r(g, tile);
      if (r.count() == 0) continue;
      by_last.clear();
      for (int64_t y = r.y0; y < r.y1; ++y) {
        for (int64_t x = r.x0; x < r.x1; ++x) {
          const int p = r.local(x, y);
          const int64_t out = (y - g.row_start) * g.width + x;
          trans[p] = static_cast<double>(final_t[out]);
          for (int64_t d = 0; d < D; ++d) {
            behind[p * D + d] = static_cast<double>(final_t[out] * background[d]);
            upstream[p * D + d] = static_cast<double>(grad_image[out * D + d]);
          }
          if (last[out] >= 0) by_last.emplace_back(last[out], p);
        }
      }
      std::sort(by_last.begin(), by_last.end(), std::greater<>());
      const int64_t deepest = by_last.empty() ? -1 : by_last.front().first;
      std::fill(live, live + kTile, 0u);
      size_t joined = 0;
      const int64_t begin = lists.offsets[tile];
      for (int64_t k = deepest; k >= 0; --k) {
        for (; joined < by_last.size() && by_last[joined].first == k; ++joined) {
          const int p = by_last[joined].second;
          live[p / kTile] |= uint32_t{1} << (p % kTile);
        }
        if (k == deepest || k + 1 == window.first) {
          window.load(lists.ids + begin, std::max<int64_t>(0, k + 1 - kWindow), k + 1, splats.data(), colors);
        }
        const Splat<scalar_t>& s = window.splat(k);
        if (s.cut < 0.0) continue;
        const scalar_t* col = window.color(k);
        double g_mx = 0.0, g_my = 0.0, g_a = 0.0, g_b = 0.0, g_c = 0.0, g_o = 0.0;
        color_sums.reset();
        double* g_col = color_sums.data();
        bool touched = false;
        const double a = s.a, b = s.b, c = s.c, o = s.o;
        for_each_pixel(s, r, live, [&](int64_t x, int64_t y) {
          const int p = r.local(x, y);
          Sample<scalar_t> px;
          if (!px.eval(s, x, y)) return;
          touched = true;
          const double alpha = px.alpha;
          const double inv = 1.0 / static_cast<double>(static_cast<scalar_t>(1) - px.alpha);
          const double t = trans[p] * inv;  // transmittance in front of this splat
          const double weight = alpha * t;
          const double* gp = upstream.data() + p * D;
          double* bp = behind.data() + p * D;
          double grad_alpha = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            const double cd = static_cast<double>(col[d]);
            grad_alpha += gp[d] * (cd * t - bp[d] * inv);
            bp[d] += cd * weight;
            g_col[d] += gp[d] * weight;
          }
          trans[p] = t;
          if (px.raw <= kMaxAlpha<scalar_t>) {  // the 0.99 clamp passes no gradient where it clamps
            const double vis = px.vis, dx = px.dx, dy = px.dy;
            const double grad_sigma = -o * vis * grad_alpha;
            g_mx -= grad_sigma * (a * dx + b * dy);
            g_my -= grad_sigma * (b * dx + c * dy);
            g_a += grad_sigma * 0.5 * dx * dx;
            g_b += grad_sigma * dx * dy;
            g_c += grad_sigma * 0.5 * dy * dy;
            g_o += grad_alpha * vis;
          }
        });
        if (!touched) continue;
        scalar_t* rec = records + (begin + k) * K;
        const double head[kSplatGrads] = {g_mx, g_my, g_a, g_b, g_c, g_o};
        for (int j = 0; j < kSplatGrads; ++j) rec[j] = static_cast<scalar_t>(head[j]);
        for (int64_t d = 0; d < D; ++d) rec[kSplatGrads + d] = static_cast<scalar_t>(g_col[d]);
      }
    }
  }
}

// Sums the intersection records of each splat in intersection order; threads own disjoint splat ranges.
template <typename scalar_t>
void reduce_records(const TileLists& lists, const scalar_t* records, int64_t n, int64_t D, scalar_t* grad_means,
                    scalar_t* grad_conics, scalar_t* grad_colors, scalar_t* grad_opacities) {
  const int64_t K = kSplatGrads + D;
  const int64_t m = lists.size;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t lo = n * me / threads, hi = n * (me + 1) / threads;
    std::vector<double> sums((hi - lo) * K, 0.0);
    for (int64_t e = 0; e < m; ++e) {
      const int64_t id = lists.ids[e];
      if (id < lo || id >= hi) continue;
      double* dst = sums.data() + (id - lo) * K;
      const scalar_t* src = records + e * K;
      for (int64_t j = 0; j < K; ++j) dst[j] += static_cast<double>(src[j]);
    }
    for (int64_t i = lo; i < hi; ++i) {
      const double* src = sums.data() + (i - lo) * K;
      grad_means[2 * i] = static_cast<scalar_t>(src[0]);
      grad_means[2 * i + 1] = static_cast<scalar_t>(src[1]);
      for (int j = 0; j < 3; ++j) grad_conics[3 * i + j] = static_cast<scalar_t>(src[2 + j]);
      grad_opacities[i] = static_cast<scalar_t>(src[5]);
      for (int64_t d = 0; d < D; ++d) grad_colors[i * D + d] = static_cast<scalar_t>(src[kSplatGrads + d]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Entry points

// Returns image [rows, W, D], final transmittance [rows, W], last contributor [rows, W] (position in the
// tile's list, -1 when none), tile offsets [tiles + 1], tile splat ids [M] and the blended pair count.
std::vector<torch::Tensor> forward(const torch::Tensor& means2d, const torch::Tensor& conics,
                                   const torch::Tensor& colors, const torch::Tensor& opacities,
                                   const torch::Tensor& depths, const torch::Tensor& radii, int64_t width,
                                   int64_t height, const torch::Tensor& background, int64_t row_start,
                                   int64_t row_end) {
  check_splat_inputs(means2d, conics, colors, opacities, background);
  TORCH_CHECK(depths.is_contiguous() && depths.numel() == means2d.size(0) && depths.scalar_type() == torch::kFloat64,
              "depths must be [N] float64");
  TORCH_CHECK(radii.is_contiguous() && radii.numel() == means2d.size(0) && radii.scalar_type() == torch::kFloat32,
              "radii must be [N] float32");
  const Grid g(width, height, row_start, row_end);
  const int64_t n = means2d.size(0), D = colors.size(1);
  auto image = torch::empty({g.rows(), width, D}, colors.options());
  auto final_t = torch::empty({g.rows(), width}, colors.options());
  auto last = torch::empty({g.rows(), width}, colors.options().dtype(torch::kInt32));
  torch::Tensor offsets, ids;
  int64_t blended = 0;
  AT_DISPATCH_FLOATING_TYPES(colors.scalar_type(), "rasterize_cpp_forward", [&] {
    const TileLists lists = bin_splats<scalar_t>(means2d.data_ptr<scalar_t>(), radii.data_ptr<float>(),
                                                 depths.data_ptr<double>(), n, g);
    const auto splats = prepare_splats<scalar_t>(means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                                                 opacities.data_ptr<scalar_t>(), n, at::get_num_threads());
    auto run = [&](auto channels) {
      forward_tiles<scalar_t>(g, lists, splats, colors.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(),
                              channels, image.data_ptr<scalar_t>(), final_t.data_ptr<scalar_t>(),
                              last.data_ptr<int32_t>(), &blended);
    };
    if (D == 3) run(Channels<3>{3}); else run(Channels<0>{D});
    offsets = lists.offsets_tensor;
    ids = lists.ids_tensor;
  });
  return {image, final_t, last, offsets, ids, torch::tensor(blended, torch::kInt64)};
}

// Returns grads for means2d [N, 2], conics [N, 3], colors [N, D], opacities [N].
std::vector<torch::Tensor> backward(const torch::Tensor& means2d, const torch::Tensor& conics,
                                    const torch::Tensor& colors, const torch::Tensor& opacities,
                                    const torch::Tensor& background, int64_t width, int64_t height,
                                    int64_t row_start, int64_t row_end, const torch::Tensor& offsets,
                                    const torch::Tensor& ids, const torch::Tensor& final_t,
                                    const torch::Tensor& last, const torch::Tensor& grad_image) {
  check_splat_inputs(means2d, conics, colors, opacities, background);
  TORCH_CHECK(grad_image.is_contiguous() && grad_image.scalar_type() == colors.scalar_type(), "grad_image dtype");
  const Grid g(width, height, row_start, row_end);
  TORCH_CHECK(offsets.numel() == g.num_tiles() + 1, "tile offsets do not match the image");
  const int64_t n = means2d.size(0), D = colors.size(1);
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && ids.scalar_type() == torch::kInt32, "tile list dtypes");
  const TileLists lists(offsets.contiguous(), ids.contiguous());
  auto records = torch::zeros({ids.numel(), kSplatGrads + D}, colors.options());
  auto grad_means = torch::empty_like(means2d), grad_conics = torch::empty_like(conics);
  auto grad_colors = torch::empty_like(colors), grad_opacities = torch::empty_like(opacities);
  AT_DISPATCH_FLOATING_TYPES(colors.scalar_type(), "rasterize_cpp_backward", [&] {
    const auto splats = prepare_splats<scalar_t>(means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
                                                 opacities.data_ptr<scalar_t>(), n, at::get_num_threads());
    auto run = [&](auto channels) {
      backward_tiles<scalar_t>(g, lists, splats, colors.data_ptr<scalar_t>(), background.data_ptr<scalar_t>(),
                               channels, final_t.data_ptr<scalar_t>(), last.data_ptr<int32_t>(),
                               grad_image.data_ptr<scalar_t>(), records.data_ptr<scalar_t>());
    };
    if (D == 3) run(Channels<3>{3}); else run(Channels<0>{D});
    reduce_records<scalar_t>(lists, records.data_ptr<scalar_t>(), n, D, grad_means.data_ptr<scalar_t>(),
                             grad_conics.data_ptr<scalar_t>(), grad_colors.data_ptr<scalar_t>(),
                             grad_opacities.data_ptr<scalar_t>());
  });
  return {grad_means, grad_conics, grad_colors, grad_opacities};
}

}  // namespace

void register_simd(pybind11::module& m);  // simd_glue.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lightning_grendel CPU tile rasterizer (forward and backward of one image)";
  m.def("forward", &forward, "Bin, sort and composite splats into rows [row_start, row_end) of one image");
  m.def("backward", &backward, "Gradients of the composite w.r.t. means2d, conics, colors and opacities");
  register_simd(m);
}

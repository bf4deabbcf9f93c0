// Vectorised backward: each tile's list back to front from the saved final transmittance and last
// contributor, 16-pixel rows as lane groups (a lane joins once k reaches its last contributor). Each
// (tile, splat) entry's gradient sums over its lanes and rows in a fixed order go to the entry's slot;
// the per-splat sums over slots then run in tile order, so gradients are bit-identical for any thread count.

#include "simd.h"
#include "simd_raster.h"

namespace lgr_simd_raster {

using namespace lgr_simd;
using lgr_raster::kTile;
using lgr_raster::TileRect;

namespace {

constexpr int kSplatGrads = 6;  // mean x, mean y, conic a, b, c, opacity; colour grads follow
constexpr float kMinAlpha = static_cast<float>(1.0 / 255.0);
constexpr float kMaxAlpha = 0.99f;

template <int StaticD>
void backward_tiles(const Grid& g, const Bins& bins, const std::vector<SplatF>& splats, const Inputs& in,
                    const float* final_t, const int32_t* last, const float* grad_image, float* records, int threads) {
  const int64_t D = StaticD > 0 ? StaticD : in.channels;
  const int64_t K = kSplatGrads + D;
  const int64_t num_tiles = g.num_tiles();
#pragma omp parallel num_threads(threads)
  {
    std::vector<VecF> trans(kTile), behind(kTile * D), upstream(kTile * D), g_col(D);
    std::vector<VecI> last_k(kTile);
    int32_t row_last[kTile];
    Window window(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const TileRect r(g, tile);
      const int64_t begin = bins.offsets[tile], count = bins.offsets[tile + 1] - begin;
      const int64_t ly0 = r.y0 - r.oy, ly1 = r.y1 - r.oy, nx = std::max<int64_t>(r.x1 - r.x0, 0);
      int32_t deepest = -1;
      for (int64_t ly = 0; ly < kTile; ++ly) {
        trans[ly] = splat(1.0f);
        last_k[ly] = splat_i(-1);
        for (int64_t d = 0; d < D; ++d) behind[d * kTile + ly] = upstream[d * kTile + ly] = splat(0.0f);
        row_last[ly] = -1;
        if (ly < ly0 || ly >= ly1) continue;
        const int64_t row = (r.oy + ly - g.row_start) * g.width + r.ox;
        for (int64_t i = 0; i < nx; ++i) {
          const float t = final_t[row + i];
          trans[ly][i] = t;
          last_k[ly][i] = last[row + i];
          row_last[ly] = std::max(row_last[ly], last[row + i]);
          for (int64_t d = 0; d < D; ++d) {
            behind[d * kTile + ly][i] = t * in.background[d];
            upstream[d * kTile + ly][i] = grad_image[(row + i) * D + d];
          }
        }
        deepest = std::max(deepest, row_last[ly]);
      }
      for (int64_t k = deepest + 1; k < count; ++k) std::fill_n(records + bins.slots[begin + k] * K, K, 0.0f);
      const VecF xc = lane_centres(static_cast<float>(r.ox) + 0.5f);
      for (int64_t k = deepest; k >= 0; --k) {
        if (k == deepest || k + 1 == window.first) {
          window.load(bins.ids + begin, std::max<int64_t>(0, k + 1 - kWindow), k + 1, splats, in.colors);
        }
        const SplatF& s = window.splat(k);
        float* rec = records + static_cast<int64_t>(bins.slots[begin + k]) * K;
        const int64_t ya = std::max<int64_t>(s.y0, r.y0) - r.oy, yb = std::min<int64_t>(s.y1, r.y1) - r.oy;
        const float* col = window.color(k);
        const VecF dx = xc - s.mx;
        const VecF adx = s.a * dx, bdx = s.b * dx, adxdx = adx * dx, half_dxdx = 0.5f * (dx * dx);
        VecF g_mx{}, g_my{}, g_a{}, g_b{}, g_c{}, g_o{};
        for (int64_t d = 0; d < D; ++d) g_col[d] = splat(0.0f);
        bool touched = false;
        for (int64_t ly = ya; ly < yb; ++ly) {
          if (row_last[ly] < k) continue;
          const float dy = (static_cast<float>(r.oy + ly) + 0.5f) - s.my;
          const float cdy = (s.c * dy) * dy;
          const VecF sigma = 0.5f * (adxdx + cdy) + bdx * dy;
          const VecF vis = fast_exp(-sigma);
          const VecF raw = s.o * vis;
          const VecF alpha = raw > kMaxAlpha ? splat(kMaxAlpha) : raw;
          const uint32_t mask = bits((sigma >= 0.0f) & (alpha >= kMinAlpha) & (last_k[ly] >= static_cast<int32_t>(k)));
          if (!mask) continue;
          touched = true;
          const VecI use = lanes(mask);
          const VecF inv = 1.0f / (1.0f - alpha);
          const VecF t = trans[ly] * inv;  // transmittance in front of this splat
          const VecF weight = alpha * t;
          VecF grad_alpha{};
          for (int64_t d = 0; d < D; ++d) {
            VecF& b = behind[d * kTile + ly];
            const VecF up = upstream[d * kTile + ly];
            grad_alpha += up * (col[d] * t - b * inv);
            b = select(use, b + col[d] * weight, b);
            g_col[d] += select(use, up * weight, splat(0.0f));
          }
          trans[ly] = select(use, t, trans[ly]);
          const VecI pass = use & (raw <= kMaxAlpha);  // the 0.99 clamp passes no gradient where it clamps
          const VecF grad_sigma = select(pass, -(s.o * vis) * grad_alpha, splat(0.0f));
          g_mx -= grad_sigma * (adx + s.b * dy);
          g_my -= grad_sigma * (bdx + s.c * dy);
          g_a += grad_sigma * half_dxdx;
          g_b += grad_sigma * (dx * dy);
          g_c += grad_sigma * (0.5f * (dy * dy));
          g_o += select(pass, grad_alpha * vis, splat(0.0f));
        }
        if (!touched) {
          std::fill_n(rec, K, 0.0f);
          continue;
        }
        const VecF head[kSplatGrads] = {g_mx, g_my, g_a, g_b, g_c, g_o};
        for (int j = 0; j < kSplatGrads; ++j) rec[j] = hsum(head[j]);
        for (int64_t d = 0; d < D; ++d) rec[kSplatGrads + d] = hsum(g_col[d]);
      }
    }
  }
}

// Per-splat sums of its records in slot (= tile) order, in double.
void reduce(const Bins& bins, const float* records, int64_t n, int64_t D, float* grad_means, float* grad_conics,
            float* grad_colors, float* grad_opacities, int threads) {
  const int64_t K = kSplatGrads + D;
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> sums(K);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t e = bins.splat_offsets[i]; e < bins.splat_offsets[i + 1]; ++e)
        for (int64_t j = 0; j < K; ++j) sums[j] += static_cast<double>(records[e * K + j]);
      grad_means[2 * i] = static_cast<float>(sums[0]);
      grad_means[2 * i + 1] = static_cast<float>(sums[1]);
      for (int j = 0; j < 3; ++j) grad_conics[3 * i + j] = static_cast<float>(sums[2 + j]);
      grad_opacities[i] = static_cast<float>(sums[5]);
      for (int64_t d = 0; d < D; ++d) grad_colors[i * D + d] = static_cast<float>(sums[kSplatGrads + d]);
    }
  }
}

}  // namespace

void backward(const Grid& g, const Bins& bins, const Inputs& in, const float* final_t, const int32_t* last,
              const float* grad_image, float* records, float* grad_means, float* grad_conics, float* grad_colors,
              float* grad_opacities, int threads) {
  const auto splats = prepare(in, g, threads);
  if (in.channels == 3) {
    backward_tiles<3>(g, bins, splats, in, final_t, last, grad_image, records, threads);
  } else {
    backward_tiles<0>(g, bins, splats, in, final_t, last, grad_image, records, threads);
  }
  reduce(bins, records, in.n, in.channels, grad_means, grad_conics, grad_colors, grad_opacities, threads);
}

}  // namespace lgr_simd_raster

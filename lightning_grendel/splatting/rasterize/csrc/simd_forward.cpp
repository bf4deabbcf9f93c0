// Vectorised forward: per tile, each splat is tested on whole 16-pixel rows (one lane group each) inside
// its row range; a row leaves the loop once all its pixels have terminated, the tile once all rows have.
// Per pixel: the scalar kernel's sigma (same float operations, no FMA), alpha = min(0.99, o exp(-sigma))
// with fast_exp, skip below 1/255, stop before T < 1e-4. Transmittance and colour are kept in float.

#include <chrono>

#include "simd.h"
#include "simd_raster.h"

namespace lgr_simd_raster {

using namespace lgr_simd;
using lgr_raster::kTile;
using lgr_raster::span_bits;
using lgr_raster::TileRect;

namespace {

constexpr float kMinAlpha = static_cast<float>(1.0 / 255.0);
constexpr float kMaxAlpha = 0.99f;
constexpr float kMinT = 1e-4f;

template <int StaticD>
int64_t forward_tiles(const Grid& g, const Bins& bins, const std::vector<SplatF>& splats, const Inputs& in,
                      float* image, float* final_t, int32_t* last, int threads) {
  const int64_t D = StaticD > 0 ? StaticD : in.channels;
  const int64_t num_tiles = g.num_tiles();
  int64_t blended = 0;
#pragma omp parallel num_threads(threads) reduction(+ : blended)
  {
    std::vector<VecF> trans(kTile), color(kTile * D);
    std::vector<VecI> last_k(kTile);
    uint32_t live[kTile];
    Window window(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const TileRect r(g, tile);
      if (r.count() == 0) continue;
      const int64_t ly0 = r.y0 - r.oy, ly1 = r.y1 - r.oy;
      int rows_live = 0;
      for (int64_t ly = 0; ly < kTile; ++ly) {
        live[ly] = ly >= ly0 && ly < ly1 ? span_bits(r.x0, r.x1, r.ox) : 0u;
        rows_live += live[ly] != 0;
        trans[ly] = splat(1.0f);
        last_k[ly] = splat_i(-1);
        for (int64_t d = 0; d < D; ++d) color[d * kTile + ly] = splat(0.0f);
      }
      const VecF xc = lane_centres(static_cast<float>(r.ox) + 0.5f);
      const int64_t begin = bins.offsets[tile], count = bins.offsets[tile + 1] - begin;
      for (int64_t k = 0; k < count && rows_live > 0; ++k) {
        if (k % kWindow == 0) window.load(bins.ids + begin, k, std::min(count, k + kWindow), splats, in.colors);
        const SplatF& s = window.splat(k);
        const int64_t ya = std::max<int64_t>(s.y0, r.y0) - r.oy, yb = std::min<int64_t>(s.y1, r.y1) - r.oy;
        if (ya >= yb) continue;
        const float* col = window.color(k);
        const VecF dx = xc - s.mx;
        const VecF adx = (s.a * dx) * dx, bdx = s.b * dx;
        for (int64_t ly = ya; ly < yb; ++ly) {
          if (!live[ly]) continue;
          const float dy = (static_cast<float>(r.oy + ly) + 0.5f) - s.my;
          const float cdy = (s.c * dy) * dy;
          const VecF sigma = 0.5f * (adx + cdy) + bdx * dy;
          const VecF raw = s.o * fast_exp(-sigma);
          const VecF alpha = raw > kMaxAlpha ? splat(kMaxAlpha) : raw;
          uint32_t mask = bits((sigma >= 0.0f) & (alpha >= kMinAlpha)) & live[ly];
          if (!mask) continue;
          VecF& t = trans[ly];
          const VecF next = t * (1.0f - alpha);
          const uint32_t done = bits(next < kMinT) & mask;
          if (done) {
            live[ly] &= ~done;
            rows_live -= live[ly] == 0;
            mask &= ~done;
            if (!mask) continue;
          }
          const VecI use = lanes(mask);
          const VecF weight = select(use, alpha * t, splat(0.0f));
          for (int64_t d = 0; d < D; ++d) color[d * kTile + ly] += weight * col[d];
          t = select(use, next, t);
          last_k[ly] = use ? splat_i(static_cast<int32_t>(k)) : last_k[ly];
          blended += __builtin_popcount(mask);
        }
      }
      const int64_t nx = r.x1 - r.x0;
      for (int64_t ly = ly0; ly < ly1; ++ly) {
        const int64_t row = (r.oy + ly - g.row_start) * g.width + r.ox;
        for (int64_t i = 0; i < nx; ++i) {
          const float t = trans[ly][i];
          for (int64_t d = 0; d < D; ++d) image[(row + i) * D + d] = color[d * kTile + ly][i] + t * in.background[d];
          final_t[row + i] = t;
          last[row + i] = last_k[ly][i];
        }
      }
    }
  }
  return blended;
}

}  // namespace

int64_t forward(const Grid& g, const Bins& bins, const Inputs& in, float* image, float* final_t, int32_t* last,
                int threads) {
  const auto splats = prepare(in, g, threads);
  if (in.channels == 3) return forward_tiles<3>(g, bins, splats, in, image, final_t, last, threads);
  return forward_tiles<0>(g, bins, splats, in, image, final_t, last, threads);
}

double exp_blend_ceiling(int64_t pairs_per_thread, int threads) {
  const int64_t steps = std::max<int64_t>(pairs_per_thread / (kLanes * kTile), 1);
  float sink = 0.0f;
  const auto start = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  {
    VecF trans[kTile], color[3 * kTile];
    for (int ly = 0; ly < kTile; ++ly) {
      trans[ly] = splat(1.0f);
      for (int d = 0; d < 3; ++d) color[d * kTile + ly] = splat(0.0f);
    }
    const VecF dx = lane_centres(-7.5f) * 0.05f;
    for (int64_t k = 0; k < steps; ++k) {
      const float o = 0.5f + 1e-9f * static_cast<float>(k & 1023), c[3] = {0.2f, 0.5f, 0.8f};
      for (int ly = 0; ly < kTile; ++ly) {
        const float dy = 0.05f * static_cast<float>(ly - 8);
        const VecF sigma = 0.5f * (dx * dx + dy * dy);
        const VecF alpha = o * fast_exp(-sigma);
        const VecF weight = alpha * trans[ly];
        for (int d = 0; d < 3; ++d) color[d * kTile + ly] += weight * c[d];
        trans[ly] = trans[ly] * (1.0f - alpha) + 1e-3f;  // stays away from 0 and denormals
      }
    }
    for (int ly = 0; ly < kTile; ++ly) sink += hsum(color[ly]) + hsum(trans[ly]);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = sink;
  (void)keep;
  return static_cast<double>(steps) * kLanes * kTile * threads / seconds;
}

}  // namespace lgr_simd_raster

// Vectorised forward: per tile, each splat's per-row ellipse spans (row_spans: the scalar kernel's,
// for all 16 rows at once) are intersected with the still-live pixels, and only the lane groups they
// reach are computed, one word of group bits per splat; the tile stops once all its pixels have terminated.
// Per pixel: the scalar kernel's sigma (same float operations, no FMA), alpha = min(0.99, o exp(-sigma))
// with fast_exp, skip below 1/255, stop before T < 1e-4. Transmittance and colour are kept in float.

#include <chrono>

#include "simd.h"
#include "simd_raster.h"

namespace lgr_simd_raster {

using namespace lgr_simd;
using lgr_raster::kTile;
using lgr_raster::kWindow;
using lgr_raster::span_bits;
using lgr_raster::TileRect;

namespace {

constexpr float kMinAlpha = static_cast<float>(1.0 / 255.0);
constexpr float kMaxAlpha = 0.99f;
constexpr float kMinT = 1e-4f;

template <int StaticD>
int64_t forward_tiles(const Grid& g, const Bins& bins, const SimdSplat* splats, const Inputs& in,
                      float* image, float* final_t, int32_t* last, int threads) {
  const int64_t D = StaticD > 0 ? StaticD : in.channels;
  constexpr int64_t J = kTile * kGroups;
  const int64_t num_tiles = g.num_tiles();
  int64_t blended = 0;
#pragma omp parallel num_threads(threads) reduction(+ : blended)
  {
    // Channel d of group j at color[d * J + j].
    std::vector<VecF> trans(J), color(J * D);
    std::vector<VecI> last_k(J);
    lgr_raster::SplatWindow<float, SimdSplat> window(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const TileRect r(g, tile);
      if (r.count() == 0) continue;
      int32_t live[kTile], spans[kTile];
      float dy[kTile];
      int rows_live = 0;
      for (int64_t ly = 0; ly < kTile; ++ly) {
        const int64_t y = r.oy + ly;
        live[ly] = y >= r.y0 && y < r.y1 ? static_cast<int32_t>(span_bits(r.x0, r.x1, r.ox)) : 0;
        rows_live += live[ly] != 0;
      }
      std::fill(trans.begin(), trans.end(), splat(1.0f));
      std::fill(color.begin(), color.end(), splat(0.0f));
      std::fill(last_k.begin(), last_k.end(), splat_i(-1));
      VecF xc[kGroups];
      for (int q = 0; q < kGroups; ++q) xc[q] = lane_centres(static_cast<float>(r.ox + q * kLanes) + 0.5f);
      const int64_t begin = bins.offsets[tile], count = bins.offsets[tile + 1] - begin;
      VecI blended_lanes = splat_i(0);
      for (int64_t k = 0; k < count && rows_live > 0; ++k) {
        if (k % kWindow == 0) window.load(bins.ids + begin, k, std::min(count, k + kWindow), splats, in.colors);
        if (k + kWindow < count) prefetch_splat(splats, in.colors, D, bins.ids[begin + k + kWindow]);
        const SimdSplat& s = window.splat(k);
        if (!s.blends) continue;
        uint32_t groups = row_spans(s, r, live, dy, spans);
        if (!groups) continue;
        const float* col = window.color(k);
        const VecI step = splat_i(static_cast<int32_t>(k));
        for (; groups; groups &= groups - 1) {
          const int j = __builtin_ctz(groups), ly = j % kTile, q = j / kTile;
          const float dyl = dy[ly], cdy = (s.c * dyl) * dyl;
          const VecF dx = xc[q] - s.mx;
          const VecF sigma = 0.5f * ((s.a * dx) * dx + cdy) + (s.b * dx) * dyl;
          const VecF raw = s.o * fast_exp(-sigma);
          const VecF alpha = raw > kMaxAlpha ? splat(kMaxAlpha) : raw;
          VecF& t = trans[j];
          const VecF next = t * (1.0f - alpha);
          // Straight-line: the lanes that blend and the lanes that terminate here as vector masks, so no
          // branch waits on the exp.
          const VecI hit = span_lanes(spans[ly], q) & (sigma >= 0.0f) & (alpha >= kMinAlpha);
          const VecI done = hit & (next < kMinT);
          const VecI use = hit & ~done;
          const int32_t before = live[ly];
          live[ly] = before & ~static_cast<int32_t>(bits(done) << (q * kLanes));
          rows_live -= (before != 0) & (live[ly] == 0);
          const VecF weight = select(use, alpha * t, splat(0.0f));
          for (int64_t d = 0; d < D; ++d) color[d * J + j] += weight * col[d];
          t = select(use, next, t);
          last_k[j] = use ? step : last_k[j];
          blended_lanes -= use;
        }
      }
      for (int i = 0; i < kLanes; ++i) blended += blended_lanes[i];
      const int64_t nx = r.x1 - r.x0;
      for (int64_t y = r.y0; y < r.y1; ++y) {
        const int64_t ly = y - r.oy, row = (y - g.row_start) * g.width + r.ox;
        for (int64_t i = 0; i < nx; ++i) {
          const int64_t j = i / kLanes * kTile + ly, lane = i % kLanes;
          const float t = trans[j][lane];
          for (int64_t d = 0; d < D; ++d) image[(row + i) * D + d] = color[d * J + j][lane] + t * in.background[d];
          final_t[row + i] = t;
          last[row + i] = last_k[j][lane];
        }
      }
    }
  }
  return blended;
}

}  // namespace

int64_t forward(const Grid& g, const Bins& bins, const SimdSplat* splats, const Inputs& in,
                float* image, float* final_t, int32_t* last, int threads) {
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

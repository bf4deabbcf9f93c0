// Vectorised backward: each tile's list back to front from the saved final transmittance and last
// contributor, over the same row spans and lane groups as the forward; a row joins once k reaches the
// deepest last contributor in it, a lane once k reaches its own. Each (tile, splat) entry's
// gradient sums over its lanes and groups in a fixed order go to a record of the entry; the per-splat
// sums over records then run in tile order, so gradients are bit-identical for any thread count.

#include <algorithm>
#include <functional>
#include <memory>
#include <utility>

#include "simd.h"
#include "simd_raster.h"

namespace lgr_simd_raster {

using namespace lgr_simd;
using lgr_raster::kTile;
using lgr_raster::kWindow;
using lgr_raster::span_bits;
using lgr_raster::TileRect;

namespace {

constexpr int kSplatGrads = 6;  // mean x, mean y, conic a, b, c, opacity; colour grads follow
constexpr float kMaxAlpha = 0.99f;
constexpr float kMinAlpha = static_cast<float>(1.0 / 255.0);

template <int StaticD>
void backward_tiles(const Grid& g, const Bins& bins, const SimdSplat* splats, const Inputs& in,
                    const float* final_t, const int32_t* last, const float* grad_image, const int32_t* record_of_slot,
                    float* records, int threads) {
  const int64_t D = StaticD > 0 ? StaticD : in.channels;
  constexpr int64_t J = kTile * kGroups;
  const int64_t K = kSplatGrads + D;
  const int64_t num_tiles = g.num_tiles();
#pragma omp parallel num_threads(threads)
  {
    // upstream: channel d of group j at [d * J + j]; behind[j]: the sum over channels of upstream times
    // the colour composited behind the current splat, all the alpha gradient needs of it.
    std::vector<VecF> trans(J), behind(J), upstream(J * D), sums(kSplatGrads + D);
    VecF* const g_col = sums.data() + kSplatGrads;  // the colour gradients accumulate in place
    std::vector<VecI> last_k(J);
    std::pair<int32_t, int> rows_by_last[kTile];  // (deepest last contributor, row), deepest first
    lgr_raster::SplatWindow<float, SimdSplat> window(D);
    int32_t window_records[kWindow];  // the record of each entry in the window
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const TileRect r(g, tile);
      const int64_t begin = bins.offsets[tile], count = bins.offsets[tile + 1] - begin;
      std::fill(trans.begin(), trans.end(), splat(1.0f));
      std::fill(behind.begin(), behind.end(), splat(0.0f));
      std::fill(upstream.begin(), upstream.end(), splat(0.0f));
      std::fill(last_k.begin(), last_k.end(), splat_i(-1));
      const int64_t nx = std::max<int64_t>(r.x1 - r.x0, 0);
      for (int ly = 0; ly < kTile; ++ly) {
        rows_by_last[ly] = {-1, ly};
        const int64_t y = r.oy + ly;
        if (y < r.y0 || y >= r.y1) continue;
        const int64_t row = (y - g.row_start) * g.width + r.ox;
        for (int64_t i = 0; i < nx; ++i) {
          const int64_t j = i / kLanes * kTile + ly, lane = i % kLanes;
          const float t = final_t[row + i];
          trans[j][lane] = t;
          last_k[j][lane] = last[row + i];
          rows_by_last[ly].first = std::max(rows_by_last[ly].first, last[row + i]);
          float up_background = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float up = grad_image[(row + i) * D + d];
            upstream[d * J + j][lane] = up;
            up_background += up * in.background[d];
          }
          behind[j][lane] = t * up_background;
        }
      }
      std::sort(rows_by_last, rows_by_last + kTile, std::greater<>());
      const int64_t deepest = rows_by_last[0].first;
      VecF xc[kGroups];
      for (int q = 0; q < kGroups; ++q) xc[q] = lane_centres(static_cast<float>(r.ox + q * kLanes) + 0.5f);
      int32_t live[kTile] = {}, spans[kTile];  // live: rows whose deepest last contributor k has reached
      float dy[kTile];
      int joined = 0;
      for (int64_t k = deepest; k >= 0; --k) {
        for (; joined < kTile && rows_by_last[joined].first == k; ++joined) {
          live[rows_by_last[joined].second] = static_cast<int32_t>(span_bits(r.x0, r.x1, r.ox));
        }
        if (k == deepest || k + 1 == window.first) {
          const int64_t k0 = std::max<int64_t>(0, k + 1 - kWindow);
          window.load(bins.ids + begin, k0, k + 1, splats, in.colors);
          // The window's record numbers too: record_of_slot is read in slot order, scattered over the
          // whole array, so one loop of independent loads here beats a cache miss per entry below.
          for (int64_t w = k0; w <= k; ++w) {
            window_records[w - k0] = record_of_slot[bins.slots[begin + w]];
            __builtin_prefetch(records + window_records[w - k0] * K, 1);
          }
        }
        const SimdSplat& s = window.splat(k);
        uint32_t groups = !s.blends ? 0u : row_spans(s, r, live, dy, spans);
        float* rec = records + window_records[k - window.first] * K;
        if (!groups) {
          std::fill(rec, rec + K, 0.0f);
          continue;
        }
        const float* col = window.color(k);
        const VecI step = splat_i(static_cast<int32_t>(k));
        // Sums of grad_sigma times dx, dy, dx^2, dx dy, dy^2: the mean and conic gradients follow from
        // them once per entry.
        VecF m_x{}, m_y{}, m_xx{}, m_xy{}, m_yy{}, g_o{};
        for (int64_t d = 0; d < D; ++d) g_col[d] = splat(0.0f);
        // Two lane groups per step: both exp and division chains are computed first, then added to the
        // sums in group order (the same order, and so the same bits, as one group at a time). Without a
        // second group the first is done again with no lane in use, which adds zeros.
        while (groups) {
          const int first = __builtin_ctz(groups);
          groups &= groups - 1;
          const bool two = groups != 0;
          const int js[2] = {first, two ? __builtin_ctz(groups) : first};
          if (two) groups &= groups - 1;
          VecF dx[2], vis[2], raw[2], alpha[2], inv[2], t[2];
          VecI use[2];
          for (int u = 0; u < 2; ++u) {
            const int j = js[u], ly = j % kTile, q = j / kTile;
            const float dyl = dy[ly], cdy = (s.c * dyl) * dyl;
            dx[u] = xc[q] - s.mx;
            const VecF sigma = 0.5f * ((s.a * dx[u]) * dx[u] + cdy) + (s.b * dx[u]) * dyl;
            vis[u] = fast_exp(-sigma);
            raw[u] = s.o * vis[u];
            alpha[u] = raw[u] > kMaxAlpha ? splat(kMaxAlpha) : raw[u];
            // Straight-line, as in the forward: lanes outside `use` add zeros.
            use[u] = span_lanes(spans[ly], q) & (sigma >= 0.0f) & (alpha[u] >= kMinAlpha) & (last_k[j] >= step);
            inv[u] = 1.0f / (1.0f - alpha[u]);
            t[u] = trans[j] * inv[u];  // transmittance in front of this splat
          }
          use[1] &= splat_i(two ? -1 : 0);
          for (int u = 0; u < 2; ++u) {
            const int j = js[u], ly = j % kTile;
            const float dyl = dy[ly];
            const VecF weight = select(use[u], alpha[u] * t[u], splat(0.0f));  // 0 in the lanes that skip it
            VecF up_col{};  // sum over channels of upstream times this splat's colour
            for (int64_t d = 0; d < D; ++d) {
              const VecF up = upstream[d * J + j];
              up_col += up * col[d];
              g_col[d] += up * weight;
            }
            const VecF grad_alpha = up_col * t[u] - behind[j] * inv[u];
            behind[j] += up_col * weight;
            trans[j] = select(use[u], t[u], trans[j]);
            const VecI pass = use[u] & (raw[u] <= kMaxAlpha);  // the 0.99 clamp passes no gradient where it clamps
            const VecF grad_sigma = select(pass, -(s.o * vis[u]) * grad_alpha, splat(0.0f));
            const VecF gx = grad_sigma * dx[u], gy = grad_sigma * dyl;
            m_x += gx, m_y += gy, m_xx += gx * dx[u], m_xy += gx * dyl, m_yy += gy * dyl;
            g_o += select(pass, grad_alpha * vis[u], splat(0.0f));
          }
        }
        // sigma = a dx^2 / 2 + b dx dy + c dy^2 / 2 with dx = x - mean x, dy = y - mean y.
        sums[0] = -(s.a * m_x + s.b * m_y), sums[1] = -(s.b * m_x + s.c * m_y);
        sums[2] = 0.5f * m_xx, sums[3] = m_xy, sums[4] = 0.5f * m_yy, sums[5] = g_o;
        hsums(sums.data(), static_cast<int>(K), rec);
      }
    }
  }
}

// Per-splat sums of its records in slot (= tile) order, in double.
void reduce(const Bins& bins, const float* records, const int32_t* record_of_slot, int64_t n, int64_t D,
            float* grad_means, float* grad_conics, float* grad_colors, float* grad_opacities, int threads) {
  const int64_t K = kSplatGrads + D;
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> sums(K);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t slot = bins.splat_offsets[i]; slot < bins.splat_offsets[i + 1]; ++slot) {
        const int32_t at = record_of_slot[slot];
        if (at < 0) continue;
        for (int64_t j = 0; j < K; ++j) sums[j] += static_cast<double>(records[at * K + j]);
      }
      grad_means[2 * i] = static_cast<float>(sums[0]);
      grad_means[2 * i + 1] = static_cast<float>(sums[1]);
      for (int j = 0; j < 3; ++j) grad_conics[3 * i + j] = static_cast<float>(sums[2 + j]);
      grad_opacities[i] = static_cast<float>(sums[5]);
      for (int64_t d = 0; d < D; ++d) grad_colors[i * D + d] = static_cast<float>(sums[kSplatGrads + d]);
    }
  }
}

// The record of each entry the backward visits (each tile's list down to its deepest last contributor:
// in a dense scene about a quarter of the entries), numbered in slot order, i.e. by splat and then tile,
// so the reduce reads the records front to back; -1 for the entries it skips. Sets `count`.
std::vector<int32_t> record_numbers(const Grid& g, const Bins& bins, const int32_t* last, int threads, int64_t& count) {
  const int64_t tiles = g.num_tiles(), slots = bins.offsets[tiles];
  std::vector<int32_t> number(slots, 0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const TileRect r(g, tile);
    int32_t deepest = -1;
    for (int64_t y = r.y0; y < r.y1; ++y) {
      const int32_t* row = last + (y - g.row_start) * g.width;
      for (int64_t x = r.x0; x < r.x1; ++x) deepest = std::max(deepest, row[x]);
    }
    for (int64_t k = 0; k <= deepest; ++k) number[bins.slots[bins.offsets[tile] + k]] = 1;
  }
  // Exclusive prefix over the marks, in one part per thread: counts, their prefix, then the numbers.
  const int64_t parts = std::max(threads, 1);
  std::vector<int64_t> start(parts + 1, 0);
#pragma omp parallel num_threads(parts)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < parts; ++c) {
      int64_t marked = 0;
      for (int64_t e = part_start(slots, c, parts); e < part_start(slots, c + 1, parts); ++e) marked += number[e];
      start[c + 1] = marked;
    }
#pragma omp single
    for (int64_t c = 0; c < parts; ++c) start[c + 1] += start[c];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < parts; ++c) {
      auto next = static_cast<int32_t>(start[c]);
      for (int64_t e = part_start(slots, c, parts); e < part_start(slots, c + 1, parts); ++e) {
        number[e] = number[e] ? next++ : -1;
      }
    }
  }
  count = start[parts];
  return number;
}

}  // namespace

void backward(const Grid& g, const Bins& bins, const SimdSplat* splats, const Inputs& in, const float* final_t,
              const int32_t* last, const float* grad_image, float* grad_means, float* grad_conics, float* grad_colors,
              float* grad_opacities, int threads) {
  int64_t count = 0;
  const std::vector<int32_t> record_of_slot = record_numbers(g, bins, last, threads, count);
  std::unique_ptr<float[]> records(new float[count * (kSplatGrads + in.channels)]);
  if (in.channels == 3) {
    backward_tiles<3>(g, bins, splats, in, final_t, last, grad_image, record_of_slot.data(), records.get(), threads);
  } else {
    backward_tiles<0>(g, bins, splats, in, final_t, last, grad_image, record_of_slot.data(), records.get(), threads);
  }
  reduce(bins, records.get(), record_of_slot.data(), in.n, in.channels, grad_means, grad_conics, grad_colors, grad_opacities,
         threads);
}

}  // namespace lgr_simd_raster

// Pieces shared by the scalar (rasterize.cpp) and vectorised (simd_*.cpp) rasterizers: the tile grid,
// each splat's tile box and depth key, and the per-splat constants of the per-pixel test. Torch-free, so
// the vectorised kernels compile as plain C++.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace lgr_raster {

constexpr int kTile = 16;
constexpr int kTilePixels = kTile * kTile;

// The pixel rectangle being rendered and the tile rows that cover it.
struct Grid {
  int64_t width, height, row_start, row_end;
  int64_t tiles_x, tiles_y, tile_row_start, tile_row_end;

  Grid(int64_t w, int64_t h, int64_t r0, int64_t r1)
      : width(w), height(h), row_start(r0), row_end(r1), tiles_x((w + kTile - 1) / kTile),
        tiles_y((h + kTile - 1) / kTile), tile_row_start(r0 / kTile), tile_row_end((r1 + kTile - 1) / kTile) {}

  int64_t num_tiles() const { return tiles_x * (tile_row_end - tile_row_start); }
  int64_t rows() const { return row_end - row_start; }
};

// The rendered pixels of one tile: columns [x0, x1), rows [y0, y1); local index (y - oy) * 16 + (x - ox).
struct TileRect {
  int64_t ox, oy, x0, x1, y0, y1;

  TileRect(const Grid& g, int64_t tile) {
    const int64_t tx = tile % g.tiles_x, ty = tile / g.tiles_x + g.tile_row_start;
    ox = tx * kTile;
    oy = ty * kTile;
    x0 = ox;
    x1 = std::min(ox + kTile, g.width);
    y0 = std::max(oy, g.row_start);
    y1 = std::min(oy + kTile, g.row_end);
  }
  int64_t count() const { return std::max<int64_t>(x1 - x0, 0) * std::max<int64_t>(y1 - y0, 0); }
  int local(int64_t x, int64_t y) const { return static_cast<int>((y - oy) * kTile + (x - ox)); }
};

// Clamp to [0, hi]; NaN goes to 0. (std::fmin/fmax compile to library calls on baseline x86-64.)
inline float clamp_index(float v, float hi) { return v > 0.0f ? (v < hi ? v : hi) : 0.0f; }

// Order-preserving integer key of a depth; -0 == +0 and NaN sorts last, as in torch.sort.
inline uint64_t depth_key(double depth) {
  if (std::isnan(depth)) return std::numeric_limits<uint64_t>::max();
  depth += 0.0;
  uint64_t bits;
  std::memcpy(&bits, &depth, sizeof bits);
  return (bits >> 63) ? ~bits : (bits | (uint64_t{1} << 63));
}

// The tiles [x0, x1) x [y0, y1) a splat's box covers: tiles.tile_bounds in float32, rows clamped to the grid.
struct TileBox {
  int32_t x0, x1, y0, y1;
};

// rx, ry: the box's half width and height (both the radius for the scalar kernel).
inline TileBox tile_box(float mx, float my, float rx, float ry, const Grid& g) {
  TileBox box{0, 0, 0, 0};
  if (!(rx > 0.0f && ry > 0.0f)) return box;
  const float tx = static_cast<float>(g.tiles_x), ty = static_cast<float>(g.tiles_y);
  const int32_t r0 = static_cast<int32_t>(g.tile_row_start), r1 = static_cast<int32_t>(g.tile_row_end);
  const float tile = static_cast<float>(kTile);
  box.x0 = static_cast<int32_t>(clamp_index(std::floor((mx - rx) / tile), tx));
  box.x1 = static_cast<int32_t>(clamp_index(std::ceil((mx + rx) / tile), tx));
  box.y0 = std::clamp(static_cast<int32_t>(clamp_index(std::floor((my - ry) / tile), ty)), r0, r1);
  box.y1 = std::clamp(static_cast<int32_t>(clamp_index(std::ceil((my + ry) / tile), ty)), r0, r1);
  return box;
}

inline TileBox tile_box(float mx, float my, float r, const Grid& g) { return tile_box(mx, my, r, r, g); }

// First integer >= v and last integer <= v, clamped to [lo, hi]. Casts instead of std::ceil/floor,
// which are library calls on baseline x86-64 (no SSE4.1) and sit in the per-row setup.
inline int64_t ceil_clamped(double v, int64_t lo, int64_t hi) {
  if (!(v > static_cast<double>(lo))) return lo;
  if (!(v < static_cast<double>(hi))) return hi;
  const int64_t i = static_cast<int64_t>(v);  // truncates toward zero
  return i < v ? i + 1 : i;
}

inline int64_t floor_clamped(double v, int64_t lo, int64_t hi) {
  if (!(v > static_cast<double>(lo))) return lo;
  if (!(v < static_cast<double>(hi))) return hi;
  const int64_t i = static_cast<int64_t>(v);
  return i > v ? i - 1 : i;
}

// Bits [xa - ox, xb - ox) of a tile row.
inline uint32_t span_bits(int64_t xa, int64_t xb, int64_t ox) {
  if (xb <= xa) return 0;
  return ((uint32_t{1} << (xb - ox)) - 1) & ~((uint32_t{1} << (xa - ox)) - 1);
}

// ---------------------------------------------------------------------------------------------------
// Per-splat constants: the exact inputs of the per-pixel test plus a conservative ellipse that bounds
// the pixels where alpha >= 1/255 can hold, so that most pixels of a tile are never visited.

template <typename scalar_t>
struct Splat {
  scalar_t mx, my, a, b, c, o;
  double cut;     // sigma above which alpha < 1/255 for certain (with margin); < 0: the splat never blends
  double det;     // a c - b^2 in double; <= 0 (or non-finite inputs) means the ellipse is not bounded
  double half_y;  // half height of the ellipse sigma <= cut
  double slope, q0, q1;  // row y's span is centre mx - slope dy, half width sqrt(q0 - q1 dy^2) (see for_each_span)
  bool bounded;
};

template <typename scalar_t>
constexpr scalar_t kMinAlpha = static_cast<scalar_t>(1.0 / 255.0);
template <typename scalar_t>
constexpr scalar_t kMaxAlpha = static_cast<scalar_t>(0.99);
template <typename scalar_t>
constexpr scalar_t kMinTransmittance = static_cast<scalar_t>(1e-4);

// Splat i's constants from the raw inputs.
template <typename scalar_t>
Splat<scalar_t> prepare_splat(const scalar_t* means, const scalar_t* conics, const scalar_t* opacities, int64_t i) {
  const double eps = std::numeric_limits<scalar_t>::epsilon();
  Splat<scalar_t> s;
  s.mx = means[2 * i];
  s.my = means[2 * i + 1];
  s.a = conics[3 * i];
  s.b = conics[3 * i + 1];
  s.c = conics[3 * i + 2];
  s.o = opacities[i];
  const double a = s.a, b = s.b, c = s.c;
  s.det = a * c - b * b;
  s.bounded = std::isfinite(s.det) && a > 0.0 && s.det > 0.0 && std::isfinite(static_cast<double>(s.mx)) &&
              std::isfinite(static_cast<double>(s.my));
  s.half_y = s.slope = s.q0 = s.q1 = 0.0;
  if (!(s.o >= kMinAlpha<scalar_t>)) {
    s.cut = -1.0;  // alpha = o * exp(-sigma) <= o < 1/255 everywhere
  } else if (!s.bounded) {
    s.cut = std::numeric_limits<double>::infinity();
  } else {
    // sigma is computed in scalar_t; its rounding error grows with the conic's condition number.
    const double mid = 0.5 * (a + c);
    const double big = mid + std::sqrt(std::max(mid * mid - s.det, 0.0));
    const double condition = big * big / s.det;
    const double exact = std::log(static_cast<double>(s.o) / static_cast<double>(kMinAlpha<scalar_t>));
    s.cut = exact * (1.01 + 64.0 * eps * condition) + 0.01;
    s.half_y = std::sqrt(2.0 * s.cut * a / s.det);
    s.slope = s.b / s.a;
    s.q0 = 2.0 * s.cut / s.a;
    s.q1 = s.det / (s.a * s.a);
  }
  return s;
}

template <typename scalar_t>
std::vector<Splat<scalar_t>> prepare_splats(const scalar_t* means, const scalar_t* conics, const scalar_t* opacities,
                                            int64_t n, int threads) {
  std::vector<Splat<scalar_t>> splats(n);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) splats[i] = prepare_splat(means, conics, opacities, i);
  return splats;
}

// Calls visit(y, bits) for the tile rows the splat's ellipse sigma <= cut may reach, bits being the pixels
// of row y inside it that are also set in live[y - oy] (one 16-bit mask per tile row: pixels still
// blending, or still to be replayed); rows where that is none are skipped.
template <typename scalar_t, typename Visit>
inline void for_each_span(const Splat<scalar_t>& s, const TileRect& r, const uint32_t* live, Visit&& visit) {
  auto visit_span = [&](int64_t y, int64_t xa, int64_t xb) {
    const uint32_t bits = live[y - r.oy] & span_bits(xa, xb, r.ox);
    if (bits) visit(y, bits);
  };
  if (!s.bounded) {
    for (int64_t y = r.y0; y < r.y1; ++y) visit_span(y, r.x0, r.x1);
    return;
  }
  // Pixel centres (x + 0.5, y + 0.5) inside the ellipse: rows |dy| <= half_y, then per row
  // |dx - centre| <= sqrt(q) with q = (2 cut a - det dy^2) / a^2.
  const double mx = s.mx, my = s.my;
  const int64_t ya = ceil_clamped(my - s.half_y - 0.5, r.y0, r.y1);
  const int64_t yb = floor_clamped(my + s.half_y - 0.5, r.y0 - 1, r.y1 - 1) + 1;
  for (int64_t y = ya; y < yb; ++y) {
    if (!live[y - r.oy]) continue;
    const double dy = static_cast<double>(y) + 0.5 - my;
    const double q = s.q0 - s.q1 * dy * dy;
    if (q < 0.0) continue;
    const double centre = mx - 0.5 - s.slope * dy, half = std::sqrt(q);
    visit_span(y, ceil_clamped(centre - half, r.x0, r.x1), floor_clamped(centre + half, r.x0 - 1, r.x1 - 1) + 1);
  }
}

// A window of one tile's list copied into contiguous thread-local arrays: a loop of independent loads
// that the CPU overlaps, instead of a cache miss per splat in the middle of the pixel loops.
constexpr int64_t kWindow = 64;

template <typename scalar_t, typename SplatT = Splat<scalar_t>>
struct SplatWindow {
  std::vector<SplatT> splats;
  std::vector<scalar_t> colors;
  int64_t first = 0, channels;

  explicit SplatWindow(int64_t D) : splats(kWindow), colors(kWindow * D), channels(D) {}

  void load(const int32_t* ids, int64_t k0, int64_t k1, const SplatT* all, const scalar_t* all_colors) {
    first = k0;
    for (int64_t k = k0; k < k1; ++k) {
      splats[k - k0] = all[ids[k]];
      const scalar_t* src = all_colors + static_cast<int64_t>(ids[k]) * channels;
      scalar_t* dst = colors.data() + (k - k0) * channels;
      if (channels == 3) {  // RGB without a call to memmove per splat
        dst[0] = src[0], dst[1] = src[1], dst[2] = src[2];
      } else {
        std::copy(src, src + channels, dst);
      }
    }
  }
  const SplatT& splat(int64_t k) const { return splats[k - first]; }
  const scalar_t* color(int64_t k) const { return colors.data() + (k - first) * channels; }
};

}  // namespace lgr_raster

// The vectorised float32 rasterizer: torch-free kernels behind simd_glue.cpp. Same tile lists, depth
// order, per-row pixel spans, per-pixel test and termination rule as the scalar kernel in rasterize.cpp;
// a tile row is 16 / kLanes lane groups (simd.h), and only the groups a splat's span and the still-live
// pixels reach are computed.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "simd.h"

namespace lgr_simd_raster {

using lgr_raster::Grid;

// What the kernels read of a splat: lgr_raster::Splat<float>'s pixel-test inputs, its row-span constants
// already in float (row_spans converts them anyway) and half_y in double; 48 bytes instead of 80, so the
// per-tile copies of the splats in depth order touch fewer cache lines.
struct SimdSplat {
  float mx, my, a, b, c, o;
  float slope, q0, q1;
  bool blends;   // cut >= 0: alpha >= 1/255 somewhere
  bool bounded;  // the ellipse is bounded; otherwise every pixel of the splat's tiles is tested
  double half_y;
};

struct Inputs {
  const float *means, *conics, *colors, *opacities, *background;
  int64_t n, channels;
};

// Tile lists shared by forward and backward: ids[offsets[t], offsets[t + 1]) is tile t's depth-sorted
// list and slots[e] the slot of entry e; splat i's slots are [splat_offsets[i], splat_offsets[i + 1])
// in tile order, so the sum per splat has one fixed order.
struct Bins {
  const int64_t* offsets;
  const int32_t* ids;
  const int32_t* slots;
  const int64_t* splat_offsets;
};

// The start of part c of [0, n) cut into `parts` equal parts: the fixed split of the steps below that must
// give the same result for any thread count.
inline int64_t part_start(int64_t n, int64_t c, int64_t parts) { return n * c / parts; }

// Preparation and binning in one pass plus a fill, so the caller can allocate the outputs in between.
// Every step runs over one fixed part of the splats (or of the depth ranks) per thread and merges the
// parts in order: the result is the same for any thread count.
class Binner {
 public:
  // Writes the prepared splats to splats[0, in.n) and the slot offsets to splat_offsets[0, in.n].
  Binner(const Inputs& in, const float* radii, const double* depths, const Grid& g, int threads, SimdSplat* splats,
         int64_t* splat_offsets);
  int64_t intersections() const { return total_; }
  void fill(int64_t* offsets, int32_t* ids, int32_t* slots) const;

 private:
  int64_t parts_;  // one per thread
  Grid grid_;
  std::vector<int32_t> order_;              // splats with a non-empty box, stable-sorted by depth
  std::vector<lgr_raster::TileBox> boxes_;  // boxes_[k]: the box of order_[k]
  std::vector<int64_t> first_slots_;        // first_slots_[k]: the first slot of order_[k]
  std::vector<int64_t> part_counts_;        // [part][tile]: entries of the part's ranks in the tile
  int64_t total_ = 0;
};

// Asks for splat id's constants and colour ahead of the window that will copy them: the window's loads
// miss the cache (the splats are read in each tile's depth order, scattered over the whole array).
inline void prefetch_splat(const SimdSplat* splats, const float* colors, int64_t channels, int32_t id) {
  const char* s = reinterpret_cast<const char*>(splats + id);
  __builtin_prefetch(s);
  __builtin_prefetch(s + sizeof(SimdSplat) - 1);
  __builtin_prefetch(colors + id * channels);
}

// Lane groups per tile row. Group q of row ly is state index q * kTile + ly in the kernels.
constexpr int kGroups = lgr_raster::kTile / lgr_simd::kLanes;

// The per-row pixel spans of for_each_span for all rows of a tile, kLanes rows at a time, in float:
// spans[ly] gets the bits x - ox of row ly's pixels that may lie inside the ellipse sigma <= cut and are
// set in live[ly]; dy[ly] the row's centre minus the splat's mean. Returns bit q * kTile + ly for each
// lane group q of row ly that a span reaches; spans and dy are only written for the rows of those bits.
// Float rounding moves a span's ends by far less than cut's margin (1% of sigma, more for
// ill-conditioned conics), so no pixel the per-pixel test accepts is lost.
inline uint32_t row_spans(const SimdSplat& s, const lgr_raster::TileRect& r, const int32_t* live,
                          float* dy, int32_t* spans) {
  using namespace lgr_simd;
  const float lo = static_cast<float>(r.x0 - r.ox), hi = static_cast<float>(r.x1 - r.ox);
  const int32_t full = static_cast<int32_t>(lgr_raster::span_bits(r.x0, r.x1, r.ox));
  uint32_t groups = 0;
  for (int h = 0; h < lgr_raster::kTile; h += kLanes) {
    const VecI live_h = load_i(live + h);
    if (!bits(live_h != 0)) continue;
    if (s.bounded) {  // skip kLanes rows the ellipse's height misses (|dy| <= half_y, with a margin)
      const double top = static_cast<double>(r.oy + h) + 0.5 - static_cast<double>(s.my), bottom = top + (kLanes - 1);
      if (bottom < -s.half_y - 1e-3 || top > s.half_y + 1e-3) continue;
    }
    const VecF d = lane_centres(static_cast<float>(r.oy + h) + 0.5f) - s.my;
    store(dy + h, d);
    VecI bits_h = splat_i(full);
    if (s.bounded) {
      const VecF q = s.q0 - s.q1 * (d * d);
      const VecF half = sqrt(q > 0.0f ? q : splat(0.0f));
      const VecF centre = (s.mx - 0.5f - static_cast<float>(r.ox)) - s.slope * d;
      // Clamped to the tile before converting, so far-away (or huge) splats stay inside int32.
      const VecI xa = ceil_i(clamp(centre - half, lo, hi));
      const VecI xb = floor_i(clamp(centre + half, lo - 1.0f, hi - 1.0f)) + 1;
      const VecI one = splat_i(1);
      bits_h = q >= 0.0f ? ((one << xb) - 1) & ~((one << xa) - 1) : splat_i(0);
    }
    bits_h &= live_h;
    store_i(spans + h, bits_h);
    for (int g = 0; g < kGroups; ++g) {
      const int32_t group = static_cast<int32_t>(kLaneBits << (g * kLanes));
      groups |= bits((bits_h & group) != 0) << (g * lgr_raster::kTile + h);
    }
  }
  return groups;
}

// Writes image [rows, W, D], final transmittance and last contributor [rows, W]; returns blended pairs.
// splats: as the Binner wrote them.
int64_t forward(const Grid& g, const Bins& bins, const SimdSplat* splats, const Inputs& in, float* image,
                float* final_t, int32_t* last, int threads);

// Writes grads [N, 2], [N, 3], [N, D], [N]; splats as given to the forward.
void backward(const Grid& g, const Bins& bins, const SimdSplat* splats, const Inputs& in,
              const float* final_t, const int32_t* last, const float* grad_image, float* grad_means, float* grad_conics,
              float* grad_colors, float* grad_opacities, int threads);

// Pairs per second of a minimal exp + blend loop (one tile, no culling): the machine's ceiling.
double exp_blend_ceiling(int64_t pairs_per_thread, int threads);

}  // namespace lgr_simd_raster

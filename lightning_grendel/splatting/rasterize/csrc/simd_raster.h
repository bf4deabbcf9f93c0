// The vectorised float32 rasterizer: torch-free kernels behind simd_glue.cpp. Same tile lists, depth
// order, per-pixel test and termination rule as the scalar kernel in rasterize.cpp; each 16-pixel tile
// row is one lane group (simd.h), so early termination and culling work per row.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace lgr_simd_raster {

using lgr_raster::Grid;

// One splat as the lane loops read it: the per-pixel test's inputs and the image rows [y0, y1) whose
// centres its alpha >= 1/255 ellipse can reach (empty when it never blends).
struct SplatF {
  float mx, my, a, b, c, o;
  int32_t y0, y1;
};

struct Inputs {
  const float *means, *conics, *colors, *opacities, *background;
  int64_t n, channels;
};

// Tile lists shared by forward and backward: ids[offsets[t], offsets[t + 1]) is tile t's depth-sorted
// list; the backward record of entry e goes to slots[e]; splat i's records are
// [splat_offsets[i], splat_offsets[i + 1]) in tile order, so the sum per splat has one fixed order.
struct Bins {
  const int64_t* offsets;
  const int32_t* ids;
  const int32_t* slots;
  const int64_t* splat_offsets;
};

// Binning in two steps so the caller can allocate the outputs in between.
class Binner {
 public:
  Binner(const float* means, const float* radii, const double* depths, int64_t n, const Grid& g, int threads);
  int64_t intersections() const { return total_; }
  void fill(int64_t* offsets, int32_t* ids, int32_t* slots, int64_t* splat_offsets) const;

 private:
  Grid grid_;
  std::vector<lgr_raster::TileBox> boxes_;
  std::vector<int32_t> order_;  // splats with a non-empty box, stable-sorted by depth
  std::vector<int64_t> counts_;
  int64_t total_ = 0;
};

std::vector<SplatF> prepare(const Inputs& in, const Grid& g, int threads);

// A window of one tile's list copied into contiguous thread-local arrays: independent loads the CPU
// overlaps, instead of a cache miss per splat inside the lane loops.
constexpr int64_t kWindow = 64;

struct Window {
  std::vector<SplatF> splats;
  std::vector<float> colors;
  int64_t first = 0, channels;

  explicit Window(int64_t D) : splats(kWindow), colors(kWindow * D), channels(D) {}

  void load(const int32_t* ids, int64_t k0, int64_t k1, const std::vector<SplatF>& all, const float* all_colors) {
    first = k0;
    for (int64_t k = k0; k < k1; ++k) {
      splats[k - k0] = all[ids[k]];
      const float* src = all_colors + static_cast<int64_t>(ids[k]) * channels;
      std::copy(src, src + channels, colors.data() + (k - k0) * channels);
    }
  }
  const SplatF& splat(int64_t k) const { return splats[k - first]; }
  const float* color(int64_t k) const { return colors.data() + (k - first) * channels; }
};

// Writes image [rows, W, D], final transmittance and last contributor [rows, W]; returns blended pairs.
int64_t forward(const Grid& g, const Bins& bins, const Inputs& in, float* image, float* final_t, int32_t* last,
                int threads);

// Writes grads [N, 2], [N, 3], [N, D], [N]; records is scratch of intersections * (6 + D) floats.
void backward(const Grid& g, const Bins& bins, const Inputs& in, const float* final_t, const int32_t* last,
              const float* grad_image, float* records, float* grad_means, float* grad_conics, float* grad_colors,
              float* grad_opacities, int threads);

// Pairs per second of a minimal exp + blend loop (one tile, no culling): the machine's ceiling.
double exp_blend_ceiling(int64_t pairs_per_thread, int threads);

}  // namespace lgr_simd_raster

// Argument checks shared by the scalar (rasterize.cpp) and vectorised (simd_glue.cpp) entry points.
#pragma once

#include <torch/extension.h>

namespace lgr_raster {

// Shapes [N, 2], [N, 3], [N, D], [N], [D]; contiguous CPU tensors of the colours' floating dtype.
inline void check_splat_inputs(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& colors,
                               const torch::Tensor& opacities, const torch::Tensor& background) {
  const auto n = means2d.size(0);
  TORCH_CHECK(means2d.dim() == 2 && means2d.size(1) == 2, "means2d must be [N, 2]");
  TORCH_CHECK(conics.dim() == 2 && conics.size(0) == n && conics.size(1) == 3, "conics must be [N, 3]");
  TORCH_CHECK(colors.dim() == 2 && colors.size(0) == n, "colors must be [N, D]");
  TORCH_CHECK(opacities.dim() == 1 && opacities.size(0) == n, "opacities must be [N]");
  TORCH_CHECK(background.dim() == 1 && background.size(0) == colors.size(1), "background must be [D]");
  for (const auto* t : {&means2d, &conics, &colors, &opacities, &background}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == colors.scalar_type(),
                "rasterize_cpp: inputs must be contiguous CPU tensors of one floating dtype");
  }
}

}  // namespace lgr_raster

// Torch entry points of the vectorised float32 rasterizer (simd_*.cpp), registered on the module that
// rasterize.cpp defines: forward_simd, backward_simd, plus bin_simd, fast_exp, simd_isa and exp_blend_ceiling
// for the tests and the benchmarks.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <limits>

#include "checks.h"
#include "simd.h"
#include "simd_raster.h"

namespace {

using lgr_raster::Grid;
using lgr_simd_raster::Bins;
using lgr_simd_raster::Inputs;

Inputs float_inputs(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& colors,
                    const torch::Tensor& opacities, const torch::Tensor& background) {
  lgr_raster::check_splat_inputs(means2d, conics, colors, opacities, background);
  TORCH_CHECK(colors.scalar_type() == torch::kFloat32, "rasterize_cpp (simd): inputs must be float32");
  const auto n = means2d.size(0);
  return Inputs{means2d.data_ptr<float>(), conics.data_ptr<float>(), colors.data_ptr<float>(),
                opacities.data_ptr<float>(), background.data_ptr<float>(), n, colors.size(1)};
}

using lgr_simd_raster::SimdSplat;

// The binning half of forward_simd: the prepared splats (bytes, for backward), their record slot offsets
// [N + 1], and the depth-sorted tile lists (offsets [tiles + 1], splat ids [M], record slots [M]).
struct Binned {
  torch::Tensor prepared, splat_offsets, offsets, ids, slots;
};

Binned bin(const Inputs& in, const torch::Tensor& depths, const torch::Tensor& radii, const Grid& g, int threads) {
  TORCH_CHECK(depths.is_contiguous() && depths.numel() == in.n && depths.scalar_type() == torch::kFloat64,
              "depths must be [N] float64");
  TORCH_CHECK(radii.is_contiguous() && radii.numel() == in.n && radii.scalar_type() == torch::kFloat32,
              "radii must be [N] float32");
  auto prepared = torch::empty({in.n * static_cast<int64_t>(sizeof(SimdSplat))}, torch::TensorOptions().dtype(torch::kUInt8));
  auto* splats = reinterpret_cast<SimdSplat*>(prepared.data_ptr<uint8_t>());
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64), i32 = torch::TensorOptions().dtype(torch::kInt32);
  auto splat_offsets = torch::empty({in.n + 1}, i64);
  const lgr_simd_raster::Binner binner(in, radii.data_ptr<float>(), depths.data_ptr<double>(), g, threads, splats,
                                       splat_offsets.data_ptr<int64_t>());
  const int64_t m = binner.intersections();
  TORCH_CHECK(m < std::numeric_limits<int32_t>::max(), "rasterize_cpp (simd): too many splat-tile pairs");
  auto offsets = torch::empty({g.num_tiles() + 1}, i64), ids = torch::empty({m}, i32), slots = torch::empty({m}, i32);
  binner.fill(offsets.data_ptr<int64_t>(), ids.data_ptr<int32_t>(), slots.data_ptr<int32_t>());
  return {prepared, splat_offsets, offsets, ids, slots};
}

// Returns image [rows, W, D], final transmittance [rows, W], last contributor [rows, W], tile offsets
// [tiles + 1], tile splat ids [M], record slots [M], per-splat slot offsets [N + 1], the prepared splats
// (bytes, for backward), blended pairs.
std::vector<torch::Tensor> forward_simd(const torch::Tensor& means2d, const torch::Tensor& conics,
                                        const torch::Tensor& colors, const torch::Tensor& opacities,
                                        const torch::Tensor& depths, const torch::Tensor& radii, int64_t width,
                                        int64_t height, const torch::Tensor& background, int64_t row_start,
                                        int64_t row_end) {
  const Inputs in = float_inputs(means2d, conics, colors, opacities, background);
  const int threads = at::get_num_threads();
  const Grid g(width, height, row_start, row_end);
  const Binned b = bin(in, depths, radii, g, threads);
  auto image = torch::empty({g.rows(), width, in.channels}, colors.options());
  auto final_t = torch::empty({g.rows(), width}, colors.options());
  auto last = torch::empty({g.rows(), width}, torch::TensorOptions().dtype(torch::kInt32));
  const Bins bins{b.offsets.data_ptr<int64_t>(), b.ids.data_ptr<int32_t>(), b.slots.data_ptr<int32_t>(),
                  b.splat_offsets.data_ptr<int64_t>()};
  const auto* splats = reinterpret_cast<const SimdSplat*>(b.prepared.data_ptr<uint8_t>());
  const int64_t blended = lgr_simd_raster::forward(g, bins, splats, in, image.data_ptr<float>(), final_t.data_ptr<float>(),
                                                   last.data_ptr<int32_t>(), threads);
  return {image, final_t, last, b.offsets, b.ids, b.slots, b.splat_offsets, b.prepared,
          torch::tensor(blended, torch::kInt64)};
}

// forward_simd's binning alone, on the same arguments: tile offsets [tiles + 1] and splat ids [M]. The step
// benchmark (benchmarks/cost_curves.py) times it to split a forward into binning and compositing.
std::vector<torch::Tensor> bin_simd(const torch::Tensor& means2d, const torch::Tensor& conics,
                                    const torch::Tensor& colors, const torch::Tensor& opacities,
                                    const torch::Tensor& depths, const torch::Tensor& radii, int64_t width,
                                    int64_t height, const torch::Tensor& background, int64_t row_start,
                                    int64_t row_end) {
  const Inputs in = float_inputs(means2d, conics, colors, opacities, background);
  const Binned b = bin(in, depths, radii, Grid(width, height, row_start, row_end), at::get_num_threads());
  return {b.offsets, b.ids};
}

// Returns grads for means2d [N, 2], conics [N, 3], colors [N, D], opacities [N].
std::vector<torch::Tensor> backward_simd(const torch::Tensor& means2d, const torch::Tensor& conics,
                                         const torch::Tensor& colors, const torch::Tensor& opacities,
                                         const torch::Tensor& background, int64_t width, int64_t height,
                                         int64_t row_start, int64_t row_end, const torch::Tensor& offsets,
                                         const torch::Tensor& ids, const torch::Tensor& slots,
                                         const torch::Tensor& splat_offsets, const torch::Tensor& prepared, const torch::Tensor& final_t,
                                         const torch::Tensor& last, const torch::Tensor& grad_image) {
  const Inputs in = float_inputs(means2d, conics, colors, opacities, background);
  const Grid g(width, height, row_start, row_end);
  TORCH_CHECK(offsets.numel() == g.num_tiles() + 1 && splat_offsets.numel() == in.n + 1 &&
                  prepared.numel() == in.n * static_cast<int64_t>(sizeof(SimdSplat)),
              "tile lists do not match the image or the splats");
  TORCH_CHECK(ids.numel() == slots.numel() && ids.scalar_type() == torch::kInt32 &&
                  slots.scalar_type() == torch::kInt32 && offsets.scalar_type() == torch::kInt64 &&
                  splat_offsets.scalar_type() == torch::kInt64 &&
                  prepared.scalar_type() == torch::kUInt8 && prepared.is_contiguous(),
              "tile list dtypes");
  TORCH_CHECK(final_t.numel() == g.rows() * width && last.numel() == final_t.numel() &&
                  final_t.scalar_type() == torch::kFloat32 && last.scalar_type() == torch::kInt32,
              "saved forward state does not match the image");
  TORCH_CHECK(grad_image.is_contiguous() && grad_image.scalar_type() == torch::kFloat32 &&
                  grad_image.numel() == g.rows() * width * in.channels,
              "grad_image must be [rows, W, D] float32");
  const Bins bins{offsets.data_ptr<int64_t>(), ids.data_ptr<int32_t>(), slots.data_ptr<int32_t>(),
                  splat_offsets.data_ptr<int64_t>()};
  auto grad_means = torch::empty_like(means2d), grad_conics = torch::empty_like(conics);
  auto grad_colors = torch::empty_like(colors), grad_opacities = torch::empty_like(opacities);
  lgr_simd_raster::backward(g, bins, reinterpret_cast<const SimdSplat*>(prepared.data_ptr<uint8_t>()), in,
                            final_t.contiguous().data_ptr<float>(), last.contiguous().data_ptr<int32_t>(),
                            grad_image.data_ptr<float>(), grad_means.data_ptr<float>(),
                            grad_conics.data_ptr<float>(), grad_colors.data_ptr<float>(),
                            grad_opacities.data_ptr<float>(), at::get_num_threads());
  return {grad_means, grad_conics, grad_colors, grad_opacities};
}

torch::Tensor fast_exp(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "fast_exp takes a float32 CPU tensor");
  auto src = x.contiguous();
  const int64_t n = src.numel(), lanes = lgr_simd::kLanes;
  auto out = torch::empty_like(src);
  std::vector<float> buffer((n + lanes - 1) / lanes * lanes, 0.0f);
  std::copy_n(src.data_ptr<float>(), n, buffer.begin());
  for (size_t i = 0; i < buffer.size(); i += lanes) lgr_simd::store(&buffer[i], lgr_simd::fast_exp(lgr_simd::load(&buffer[i])));
  std::copy_n(buffer.begin(), n, out.data_ptr<float>());
  return out;
}

}  // namespace

void register_simd(pybind11::module& m) {
  m.def("forward_simd", &forward_simd, "Vectorised float32 forward; also returns the record slots for backward");
  m.def("bin_simd", &bin_simd, "forward_simd's binning alone: tile offsets and depth-sorted splat ids");
  m.def("backward_simd", &backward_simd, "Vectorised float32 backward over forward_simd's tile lists");
  m.def("fast_exp", &fast_exp, "The kernels' vectorised exp, elementwise (for testing its error bound)");
  m.def("simd_isa", [] { return std::string(lgr_simd::isa()); }, "Instruction set the lane groups compile to");
  m.def("exp_blend_ceiling", &lgr_simd_raster::exp_blend_ceiling, "Pairs/s of a minimal exp + blend loop",
        pybind11::arg("pairs_per_thread"), pybind11::arg("threads"));
}

// The two table lookups of a knowledge-graph training step, forward and backward, without materialising
// the gathered rows.
//
//   tail_scores:      s[b, j] = <h[b], E[t[b, j]]>_L + bias[t[b, j]]       (B x n scores against one table)
//   relation_matvec:  z[b]    = W[r[b]] x[b]                                (B per-relation d x d maps)
//
// Their torch equivalents (index_select + bmm, lightning_grendel/hyperbolic/kg_ops.py, the reference)
// write a (B, n, d) or (B, d, d) copy of the gathered rows and scatter a same-sized gradient back with
// index_add_. Here the forward reads each row where it lies, and each backward accumulates straight into
// the dense table gradient. A table row's gradient is summed over (b, j) in the same order whatever the
// thread count (threads own disjoint ranges of table rows), so results are bit-identical for any count.
// (Loops inside the AT_DISPATCH lambdas use _Pragma: a #pragma line cannot sit inside a macro argument.)

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>

namespace {

constexpr int64_t kAhead = 8;  // rows are fetched this many lookups ahead: the table is read in random order

void check_cpu(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dim, "kg_ops: ", name, " must be a contiguous ",
              dim, "-d CPU tensor");
}

void check_index(const torch::Tensor& index, const char* name, int64_t size) {
  TORCH_CHECK(index.scalar_type() == torch::kLong, "kg_ops: ", name, " must be int64");
  if (index.numel() > 0) {
    TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < size, "kg_ops: ", name,
                " holds an index outside [0, ", size, ")");
  }
}

template <typename T>
inline T minkowski(const T* __restrict a, const T* __restrict b, int64_t d) {
  T space = 0;
#pragma omp simd reduction(+ : space)
  for (int64_t j = 1; j < d; ++j) space += a[j] * b[j];
  return space - a[0] * b[0];
}

torch::Tensor tail_scores(torch::Tensor h, torch::Tensor table, torch::Tensor bias, torch::Tensor tails) {
  check_cpu(h, "h", 2), check_cpu(table, "table", 2), check_cpu(bias, "bias", 1), check_cpu(tails, "tails", 2);
  TORCH_CHECK(h.size(1) == table.size(1) && bias.size(0) == table.size(0) && tails.size(0) == h.size(0),
              "tail_scores: shapes do not match");
  TORCH_CHECK(table.scalar_type() == h.scalar_type() && bias.scalar_type() == h.scalar_type(),
              "tail_scores: one dtype for h, table and bias");
  check_index(tails, "tails", table.size(0));
  const int64_t batch = h.size(0), n = tails.size(1), d = h.size(1);
  auto out = torch::empty({batch, n}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "tail_scores", [&] {
    const scalar_t* ph = h.data_ptr<scalar_t>();
    const scalar_t* pe = table.data_ptr<scalar_t>();
    const scalar_t* pb = bias.data_ptr<scalar_t>();
    const int64_t* pt = tails.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = b * n + j;
          if (i + kAhead < batch * n) __builtin_prefetch(pe + pt[i + kAhead] * d);
          po[i] = minkowski(ph + b * d, pe + pt[i] * d, d) + pb[pt[i]];
        }
      }
    });
  });
  return out;
}

// Gradients of tail_scores: (dh, dtable, dbias) from dscores.
std::vector<torch::Tensor> tail_scores_backward(torch::Tensor grad, torch::Tensor h, torch::Tensor table,
                                                torch::Tensor tails) {
  check_cpu(grad, "grad", 2), check_cpu(h, "h", 2), check_cpu(table, "table", 2), check_cpu(tails, "tails", 2);
  TORCH_CHECK(grad.sizes() == tails.sizes() && grad.scalar_type() == h.scalar_type(),
              "tail_scores_backward: the gradient must match the scores");
  const int64_t batch = h.size(0), n = tails.size(1), d = h.size(1), rows = table.size(0);
  auto grad_h = torch::empty_like(h);
  auto grad_table = torch::zeros_like(table);
  auto grad_bias = torch::zeros({rows}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "tail_scores_backward", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* ph = h.data_ptr<scalar_t>();
    const scalar_t* pe = table.data_ptr<scalar_t>();
    const int64_t* pt = tails.data_ptr<int64_t>();
    scalar_t* pgh = grad_h.data_ptr<scalar_t>();
    scalar_t* pge = grad_table.data_ptr<scalar_t>();
    scalar_t* pgb = grad_bias.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {  // dh[b] = sum_j g[b, j] G E[t[b, j]]
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* out = pgh + b * d;
        for (int64_t c = 0; c < d; ++c) out[c] = 0;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = b * n + j;
          if (i + kAhead < batch * n) __builtin_prefetch(pe + pt[i + kAhead] * d);
          const scalar_t g = pg[i];
          const scalar_t* e = pe + pt[i] * d;
          _Pragma("omp simd")
          for (int64_t c = 0; c < d; ++c) out[c] += g * e[c];
        }
        out[0] = -out[0];
      }
    });
    at::parallel_for(0, rows, 4096, [&](int64_t lo, int64_t hi) {  // dE[t] += g[b, j] G h[b], by owned rows
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* hb = ph + b * d;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = b * n + j;
          if (i + kAhead < batch * n) __builtin_prefetch(pge + pt[i + kAhead] * d, 1);
          const int64_t t = pt[i];
          if (t < lo || t >= hi) continue;
          const scalar_t g = pg[b * n + j];
          scalar_t* out = pge + t * d;
          out[0] -= g * hb[0];
          _Pragma("omp simd")
          for (int64_t c = 1; c < d; ++c) out[c] += g * hb[c];
          pgb[t] += g;
        }
      }
    });
  });
  return {grad_h, grad_table, grad_bias};
}

torch::Tensor relation_matvec(torch::Tensor weight, torch::Tensor x, torch::Tensor relation) {
  check_cpu(weight, "weight", 3), check_cpu(x, "x", 2), check_cpu(relation, "relation", 1);
  TORCH_CHECK(weight.size(2) == x.size(1) && relation.size(0) == x.size(0) && weight.scalar_type() == x.scalar_type(),
              "relation_matvec: shapes or dtypes do not match");
  check_index(relation, "relation", weight.size(0));
  const int64_t batch = x.size(0), rows = weight.size(1), cols = weight.size(2);
  auto out = torch::empty({batch, rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relation_matvec", [&] {
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const int64_t* pr = relation.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* w = pw + pr[b] * rows * cols;
        const scalar_t* xb = px + b * cols;
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t sum = 0;
          _Pragma("omp simd reduction(+ : sum)")
          for (int64_t c = 0; c < cols; ++c) sum += w[i * cols + c] * xb[c];
          po[b * rows + i] = sum;
        }
      }
    });
  });
  return out;
}

// Gradients of relation_matvec: (dweight, dx) from dz.
std::vector<torch::Tensor> relation_matvec_backward(torch::Tensor grad, torch::Tensor weight, torch::Tensor x,
                                                    torch::Tensor relation) {
  check_cpu(grad, "grad", 2), check_cpu(weight, "weight", 3), check_cpu(x, "x", 2), check_cpu(relation, "relation", 1);
  const int64_t batch = x.size(0), rows = weight.size(1), cols = weight.size(2), relations = weight.size(0);
  TORCH_CHECK(grad.size(0) == batch && grad.size(1) == rows && grad.scalar_type() == x.scalar_type(),
              "relation_matvec_backward: the gradient must match the output");
  auto grad_weight = torch::zeros_like(weight);
  auto grad_x = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relation_matvec_backward", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const int64_t* pr = relation.data_ptr<int64_t>();
    scalar_t* pgw = grad_weight.data_ptr<scalar_t>();
    scalar_t* pgx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {  // dx[b] = W[r[b]]^T g[b]
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* w = pw + pr[b] * rows * cols;
        scalar_t* out = pgx + b * cols;
        for (int64_t c = 0; c < cols; ++c) out[c] = 0;
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t g = pg[b * rows + i];
          _Pragma("omp simd")
          for (int64_t c = 0; c < cols; ++c) out[c] += g * w[i * cols + c];
        }
      }
    });
    at::parallel_for(0, relations, 1, [&](int64_t lo, int64_t hi) {  // dW[r] += g[b] x[b]^T, by owned relations
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t r = pr[b];
        if (r < lo || r >= hi) continue;
        scalar_t* out = pgw + r * rows * cols;
        const scalar_t* xb = px + b * cols;
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t g = pg[b * rows + i];
          _Pragma("omp simd")
          for (int64_t c = 0; c < cols; ++c) out[i * cols + c] += g * xb[c];
        }
      }
    });
  });
  return {grad_weight, grad_x};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tail_scores", &tail_scores, "s[b, j] = <h[b], table[tails[b, j]]>_L + bias[tails[b, j]]");
  m.def("tail_scores_backward", &tail_scores_backward, "(dh, dtable, dbias) of tail_scores");
  m.def("relation_matvec", &relation_matvec, "z[b] = weight[relation[b]] @ x[b]");
  m.def("relation_matvec_backward", &relation_matvec_backward, "(dweight, dx) of relation_matvec");
}

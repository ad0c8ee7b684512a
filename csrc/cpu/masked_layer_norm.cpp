// masked_layer_norm on the CPU (semantics: cofi_kernels/reference.py).
// Forward: y = residual + x*layer_gate*hidden_gate, statistics over kept dims
// (hidden_gate != 0), out = (norm(y)*weight + bias)*hidden_gate. The backward
// recomputes y from x and residual instead of saving it.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../op_checks.h"
#include "vec_rows.h"

namespace cofi::cpu {
namespace {

// Error messages name the registered op that was called.
constexpr const char* kFwd = "cofi::masked_layer_norm_fwd";
constexpr const char* kBwd = "cofi::masked_layer_norm_bwd";

// Per-dim factors derived once from the (small) parameters and gates.
struct DimFactors {
  std::vector<float> keep;    // 1 where hidden_gate != 0
  std::vector<float> hgate;   // hidden_gate, or 1
  std::vector<float> xscale;  // layer_gate * hidden_gate: what x is multiplied by
  std::vector<float> weff;    // keep * weight * hidden_gate
  std::vector<float> beff;    // bias * hidden_gate
  std::vector<float> weight, bias;
  float layer_gate = 1.0f;
  float inv_kept = 1.0f;  // 1 / max(#kept, 1)
};

DimFactors make_factors(const char* op, int64_t dims, const at::Tensor& weight, const at::Tensor& bias,
                        const std::optional<at::Tensor>& layer_gate, const std::optional<at::Tensor>& hidden_gate) {
  DimFactors f;
  const at::Tensor w = as_float_vector(weight), b = as_float_vector(bias);
  f.weight.assign(w.const_data_ptr<float>(), w.const_data_ptr<float>() + dims);
  f.bias.assign(b.const_data_ptr<float>(), b.const_data_ptr<float>() + dims);
  f.hgate.assign(dims, 1.0f);
  if (hidden_gate) {
    const at::Tensor h = as_float_vector(*hidden_gate);
    f.hgate.assign(h.const_data_ptr<float>(), h.const_data_ptr<float>() + dims);
  }
  if (layer_gate) {
    f.layer_gate = layer_gate->to(at::kFloat).item<float>();
  }
  f.keep.resize(dims);
  f.xscale.resize(dims);
  f.weff.resize(dims);
  f.beff.resize(dims);
  int64_t kept = 0;
  for (int64_t k = 0; k < dims; ++k) {
    const float h = f.hgate[k];
    TORCH_CHECK(!std::isnan(h), op, ": hidden_gate contains NaN at index ", k,
                "; kept dims are those with hidden_gate != 0, so NaN is ambiguous");
    f.keep[k] = h != 0.0f ? 1.0f : 0.0f;
    kept += h != 0.0f;
    f.xscale[k] = f.layer_gate * h;
    f.weff[k] = f.keep[k] * f.weight[k] * h;
    f.beff[k] = f.bias[k] * h;
  }
  f.inv_kept = 1.0f / static_cast<float>(std::max<int64_t>(kept, 1));
  return f;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                  const at::Tensor& bias, const std::optional<at::Tensor>& layer_gate,
                  const std::optional<at::Tensor>& hidden_gate) {
  check_cpu_capability();
  check_masked_layer_norm_args(op, x, residual, weight, bias, layer_gate, hidden_gate, c10::DeviceType::CPU);
}

// y = residual + x * xscale into y; returns its (kept) mean and rstd.
inline std::pair<float, float> row_statistics(const float* xr, const float* rr, float* y, const DimFactors& f,
                                              int64_t dims, float eps) {
  Vec sum(0.0f);
  for_each_vec(dims, [&](int64_t j, int64_t count) {
    const Vec yv = load(rr + j, count) + load(xr + j, count) * load(f.xscale.data() + j, count);
    store(yv, y + j, count);
    sum = sum + yv * load(f.keep.data() + j, count);
  });
  const float mean = reduce_sum(sum) * f.inv_kept;
  Vec sq(0.0f);
  for_each_vec(dims, [&](int64_t j, int64_t count) {
    const Vec c = (load(y + j, count) - Vec(mean)) * load(f.keep.data() + j, count);
    sq = sq + c * c;
  });
  const float var = reduce_sum(sq) * f.inv_kept;
  return {mean, 1.0f / std::sqrt(var + eps)};
}

template <typename T>
void forward_rows(const T* x, const T* res, T* out, float* mean, float* rstd, const DimFactors& f, int64_t rows,
                  int64_t dims, float eps) {
  at::parallel_for(0, rows, row_grain(dims), [&](int64_t r0, int64_t r1) {
    std::vector<float> x_buf(dims), r_buf(dims), y(dims), o_buf(dims);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = row_as_float(x + r * dims, x_buf.data(), dims);
      const float* rr = row_as_float(res + r * dims, r_buf.data(), dims);
      const auto [mu, rs] = row_statistics(xr, rr, y.data(), f, dims, eps);
      mean[r] = mu;
      rstd[r] = rs;
      float* o = row_out_float(out + r * dims, o_buf.data());
      for_each_vec(dims, [&](int64_t j, int64_t count) {
        const Vec v = (load(y.data() + j, count) - Vec(mu)) * Vec(rs) * load(f.weff.data() + j, count) +
                      load(f.beff.data() + j, count);
        store(v, o + j, count);
      });
      store_row(o, out + r * dims, dims);
    }
  });
}

struct BackwardOut {
  void* dx;
  void* dres;
  float* partials;  // [chunks, 3, dims] (weight, bias, hidden_gate) then [chunks] layer_gate
  bool want_dhg, want_dlg;
};

template <typename T>
void backward_rows(const T* grad, const T* x, const T* res, const float* mean, const float* rstd,
                   const DimFactors& f, const BackwardOut& o, int64_t rows, int64_t dims) {
  const int64_t chunks = reduction_chunks(rows);
  T* dx = static_cast<T*>(o.dx);
  T* dres = static_cast<T*>(o.dres);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> g_buf(dims), x_buf(dims), r_buf(dims), nhat(dims), dnhat(dims), dy_buf(dims),
        dx_buf(dims);
    for (int64_t c = c0; c < c1; ++c) {
      float* acc_w = o.partials + c * 3 * dims;
      float* acc_b = acc_w + dims;
      float* acc_h = acc_b + dims;
      float acc_lg = 0.0f;
      for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r) {
        const float* gr = row_as_float(grad + r * dims, g_buf.data(), dims);
        const float* xr = row_as_float(x + r * dims, x_buf.data(), dims);
        const float* rr = row_as_float(res + r * dims, r_buf.data(), dims);
        const Vec mu(mean[r]), rs(rstd[r]);
        Vec s1(0.0f), s2(0.0f);
        for_each_vec(dims, [&](int64_t j, int64_t count) {
          const Vec y = load(rr + j, count) + load(xr + j, count) * load(f.xscale.data() + j, count);
          const Vec nh = (y - mu) * rs * load(f.keep.data() + j, count);
          const Vec g = load(gr + j, count);
          const Vec dn = g * load(f.weff.data() + j, count);
          store(nh, nhat.data() + j, count);
          store(dn, dnhat.data() + j, count);
          s1 = s1 + dn;
          s2 = s2 + dn * nh;
          const Vec gh = g * load(f.hgate.data() + j, count);
          store(load(acc_w + j, count) + gh * nh, acc_w + j, count);
          store(load(acc_b + j, count) + gh, acc_b + j, count);
          if (o.want_dhg) {
            const Vec direct = g * (nh * load(f.weight.data() + j, count) + load(f.bias.data() + j, count));
            store(load(acc_h + j, count) + direct, acc_h + j, count);
          }
        });
        const Vec mean_dn(reduce_sum(s1) * f.inv_kept), mean_dn_nh(reduce_sum(s2) * f.inv_kept);
        float* dy = dres ? row_out_float(dres + r * dims, dy_buf.data()) : dy_buf.data();
        float* dxr = dx ? row_out_float(dx + r * dims, dx_buf.data()) : dx_buf.data();
        Vec lg_sum(0.0f);
        for_each_vec(dims, [&](int64_t j, int64_t count) {
          const Vec nh = load(nhat.data() + j, count);
          const Vec d = rs * (load(dnhat.data() + j, count) -
                              load(f.keep.data() + j, count) * (mean_dn + nh * mean_dn_nh));
          store(d, dy + j, count);
          if (dx) store(d * load(f.xscale.data() + j, count), dxr + j, count);
          if (o.want_dhg || o.want_dlg) {
            const Vec dyx = d * load(xr + j, count);
            if (o.want_dhg) store(load(acc_h + j, count) + dyx * Vec(f.layer_gate), acc_h + j, count);
            if (o.want_dlg) lg_sum = lg_sum + dyx * load(f.hgate.data() + j, count);
          }
        });
        acc_lg += reduce_sum(lg_sum);
        if (dres) store_row(dy, dres + r * dims, dims);
        if (dx) store_row(dxr, dx + r * dims, dims);
      }
      o.partials[chunks * 3 * dims + c] = acc_lg;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_layer_norm_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& res_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& layer_gate, const std::optional<at::Tensor>& hidden_gate, double eps) {
  check_inputs(kFwd, x_in, res_in, weight, bias, layer_gate, hidden_gate);
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous();
  const int64_t dims = x.size(-1), rows = dims == 0 ? 0 : x.numel() / dims;
  const DimFactors f = make_factors(kFwd, dims, weight, bias, layer_gate, hidden_gate);
  at::Tensor out = at::empty_like(x);
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(stat_shape, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_layer_norm_fwd_cpu", [&] {
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<float>(),
                           rstd.mutable_data_ptr<float>(), f, rows, dims, static_cast<float>(eps));
  });
  return {out, mean, rstd};
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads6 masked_layer_norm_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& res_in,
                                 const at::Tensor& weight, const at::Tensor& bias,
                                 const std::optional<at::Tensor>& layer_gate,
                                 const std::optional<at::Tensor>& hidden_gate, const at::Tensor& mean_in,
                                 const at::Tensor& rstd_in, std::array<bool, 6> mask) {
  check_inputs(kBwd, x_in, res_in, weight, bias, layer_gate, hidden_gate);
  check_same_as(kBwd, grad_in, "grad_out", x_in, "x");
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous(), grad = grad_in.contiguous();
  const int64_t dims = x.size(-1), rows = dims == 0 ? 0 : x.numel() / dims;
  TORCH_CHECK(mean_in.numel() == rows && rstd_in.numel() == rows && mean_in.scalar_type() == at::kFloat &&
                  rstd_in.scalar_type() == at::kFloat,
              kBwd, ": mean and rstd must be the float32 statistics returned by the forward, one per row");
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const DimFactors f = make_factors(kBwd, dims, weight, bias, layer_gate, hidden_gate);
  const bool want_dlg = mask[4] && layer_gate.has_value(), want_dhg = mask[5] && hidden_gate.has_value();
  at::Tensor dx = mask[0] ? at::empty_like(x) : not_requested(x);
  at::Tensor dres = mask[1] ? at::empty_like(x) : not_requested(x);
  const int64_t chunks = reduction_chunks(rows);
  const at::Tensor partials = at::zeros({chunks * 3 * dims + chunks}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_layer_norm_bwd_cpu", [&] {
      const BackwardOut o{mask[0] ? dx.mutable_data_ptr() : nullptr, mask[1] ? dres.mutable_data_ptr() : nullptr,
                          partials.mutable_data_ptr<float>(), want_dhg, want_dlg};
      backward_rows<scalar_t>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              res.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(),
                              rstd.const_data_ptr<float>(), f, o, rows, dims);
    });
  }
  const int64_t stride = 3 * dims;
  auto column_sums = [&](int64_t slot, const at::Tensor& like) {
    return sum_chunk_partials(partials, chunks, stride, slot * dims, dims, like.scalar_type());
  };
  at::Tensor dw = mask[2] ? column_sums(0, weight) : not_requested(x);
  at::Tensor db = mask[3] ? column_sums(1, bias) : not_requested(x);
  at::Tensor dhg = want_dhg ? column_sums(2, *hidden_gate) : not_requested(x);
  at::Tensor dlg = want_dlg ? sum_chunk_partials(partials, chunks, 1, chunks * stride, 1, layer_gate->scalar_type())
                                  .reshape(layer_gate->sizes())
                            : not_requested(x);
  return {dx, dres, dw, db, dlg, dhg};
}

}  // namespace
}  // namespace cofi::cpu

TORCH_LIBRARY_IMPL(cofi, CPU, m) {
  m.impl("masked_layer_norm_fwd", &cofi::cpu::masked_layer_norm_fwd_cpu);
  m.impl("masked_layer_norm_bwd", &cofi::cpu::masked_layer_norm_bwd_cpu);
}

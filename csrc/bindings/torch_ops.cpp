// Torch glue of the mage-kernels CUDA backend: registers the `mage_cuda::` ops.
//
// The kernels themselves (csrc/kernels/*.cu) know nothing about torch; this
// file validates tensors (device, dtype, shape, contiguity, with messages that
// name the offending argument), picks the current CUDA stream and device, and
// calls the launchers of csrc/include/mage_kernels/*.h.
//
// Schemas are exactly those of the Python-side ops `mage::pema_update_`
// (mage_kernels/ema.py) and `mage::weight_grad_with_fisher`
// (mage_kernels/kernels/weight_grad.py), so backend "cuda" | "triton" | "torch"
// are interchangeable; mage_kernels.cuda_extension.schema_mismatches() checks it.
//
// The file also defines the Python module `mage_kernels._C` (empty: importing
// it is what loads the library and runs the registrations below).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <string>
#include <vector>

#include "mage_kernels/dtype.h"
#include "mage_kernels/pema.h"
#include "mage_kernels/weight_grad.h"

namespace {

using mage_kernels::DType;

std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

// ----------------------------------------------------------------------------- pema_update_

at::Tensor pema_update_cuda(at::TensorList params, at::TensorList emas, at::TensorList grads, at::TensorList fishers,
                            double lam, double beta_fallback) {
  const size_t n = emas.size();
  TORCH_CHECK(params.size() == n && grads.size() == n && fishers.size() == n,
              "mage_cuda::pema_update_: params, emas, grads and fishers must have the same length; got ",
              params.size(), ", ", n, ", ", grads.size(), " and ", fishers.size());
  TORCH_CHECK(n > 0, "mage_cuda::pema_update_: the tensor lists are empty");
  TORCH_CHECK(n < static_cast<size_t>(INT_MAX), "mage_cuda::pema_update_: too many tensors (", n, ")");
  const at::Device device = emas[0].device();
  TORCH_CHECK(device.is_cuda(), "mage_cuda::pema_update_: emas[0] is on ", device, "; the CUDA kernel needs CUDA tensors");

  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided inputs, alive until after the launch
  std::vector<mage_kernels::PemaTensor> table(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& e = emas[i];
    const at::Tensor* role[4] = {&params[i], &emas[i], &grads[i], &fishers[i]};
    const char* names[4] = {"params", "emas", "grads", "fishers"};
    DType dt[4];
    for (int r = 0; r < 4; ++r) {
      const at::Tensor& t = *role[r];
      TORCH_CHECK(t.defined(), "mage_cuda::pema_update_: ", names[r], "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device, "mage_cuda::pema_update_: ", names[r], "[", i, "] is on ", t.device(),
                  " but emas[0] is on ", device, "; use one CUDA device");
      const auto d = to_dtype(t.scalar_type());
      TORCH_CHECK(d.has_value(), "mage_cuda::pema_update_: ", names[r], "[", i, "] has dtype ", t.scalar_type(),
                  "; the CUDA kernel supports float32, float16 and bfloat16 (use backend 'triton' or 'torch')");
      dt[r] = *d;
      TORCH_CHECK(t.sizes() == e.sizes(), "mage_cuda::pema_update_: ", names[r], "[", i, "] has shape ", t.sizes(),
                  " but emas[", i, "] has shape ", e.sizes());
    }
    TORCH_CHECK(e.is_contiguous(), "mage_cuda::pema_update_: emas[", i, "] must be contiguous (it is updated in place)");
    const at::Tensor* in[3] = {&params[i], &grads[i], &fishers[i]};
    const void* ptr[3];
    for (int r = 0; r < 3; ++r) {
      if (in[r]->is_contiguous()) {
        ptr[r] = in[r]->data_ptr();
      } else {
        keep_alive.push_back(in[r]->contiguous());
        ptr[r] = keep_alive.back().data_ptr();
      }
    }
    table[i] = mage_kernels::PemaTensor{ptr[0], e.data_ptr(), ptr[1], ptr[2], e.numel(), dt[0], dt[1], dt[2], dt[3]};
  }

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor counts = at::zeros({2}, at::TensorOptions().dtype(at::kLong).device(device));
  const int num = static_cast<int>(n);
  // The table goes through pinned host memory; the non-blocking copy is ordered
  // on the current stream before the kernel, and the caching host allocator keeps
  // the pinned block alive until the copy has finished.
  at::Tensor host = at::empty({static_cast<int64_t>(mage_kernels::pema_table_bytes(num))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  const int64_t chunks = mage_kernels::pema_fill_table(table.data(), num, host.data_ptr());
  if (chunks == 0) return counts;
  TORCH_CHECK(chunks <= INT_MAX, "mage_cuda::pema_update_: ", chunks, " chunks exceed the grid limit");
  at::Tensor dev_table = host.to(device, /*non_blocking=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(mage_kernels::pema_update_launch(dev_table.data_ptr(), num, chunks, static_cast<float>(lam),
                                                  static_cast<float>(beta_fallback), counts.data_ptr<int64_t>(), stream));
  return counts;
}

at::Tensor pema_update_meta(at::TensorList /*params*/, at::TensorList emas, at::TensorList /*grads*/,
                            at::TensorList /*fishers*/, double /*lam*/, double /*beta_fallback*/) {
  TORCH_CHECK(!emas.empty(), "mage_cuda::pema_update_: the tensor lists are empty");
  return at::empty({2}, at::TensorOptions().dtype(at::kLong).device(emas[0].device()));
}

// ----------------------------------------------------------------------------- weight_grad_with_fisher

// Output rows P: 65535 blocks of (at least) 64 rows along grid y.
constexpr int64_t kMaxRows = 65535LL * 64;

void check_weight_grad_inputs(const at::Tensor& g, const at::Tensor& x, int64_t num_samples,
                              const std::optional<at::Tensor>& fisher, const std::optional<at::Tensor>& token_weight) {
  const char* op = "mage_cuda::weight_grad_with_fisher";
  TORCH_CHECK(g.dim() == 2, op, ": g must be 2-D [tokens, P], got shape ", g.sizes());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, Q], got shape ", x.sizes());
  TORCH_CHECK(g.is_cuda(), op, ": g is on ", g.device(), "; the CUDA kernel needs CUDA tensors");
  TORCH_CHECK(x.device() == g.device(), op, ": x is on ", x.device(), " but g is on ", g.device());
  TORCH_CHECK(to_dtype(g.scalar_type()).has_value(), op, ": g has dtype ", g.scalar_type(),
              "; the CUDA kernel supports float32, float16 and bfloat16 (use backend 'torch' for others)");
  TORCH_CHECK(x.scalar_type() == g.scalar_type(), op, ": g is ", g.scalar_type(), " but x is ", x.scalar_type());
  TORCH_CHECK(g.size(0) == x.size(0), op, ": g has ", g.size(0), " tokens but x has ", x.size(0));
  const int64_t m = g.size(0), p = g.size(1), q = x.size(1);
  TORCH_CHECK(p <= kMaxRows, op, ": g has ", p, " columns; the kernel's grid allows at most ", kMaxRows);
  if (fisher.has_value() && fisher->defined()) {
    const at::Tensor& f = *fisher;
    TORCH_CHECK(f.scalar_type() == at::kFloat, op, ": the Fisher buffer must be float32, got ", f.scalar_type());
    TORCH_CHECK(f.dim() == 2 && f.size(0) == p && f.size(1) == q, op, ": fisher must be [", p, ", ", q, "], got ",
                f.sizes());
    TORCH_CHECK(f.device() == g.device(), op, ": fisher is on ", f.device(), " but g is on ", g.device());
    TORCH_CHECK(at::has_internal_overlap(f) != at::MemOverlap::Yes, op,
                ": fisher has overlapping elements (e.g. an expanded tensor) and cannot be updated in place");
    TORCH_CHECK(m == 0 || (num_samples > 0 && m % num_samples == 0), m, " tokens do not split into ", num_samples,
                " samples");
  }
  if (token_weight.has_value() && token_weight->defined()) {
    const at::Tensor& w = *token_weight;
    TORCH_CHECK(w.numel() == m, op, ": token_weight has ", w.numel(), " entries for ", m, " tokens");
    TORCH_CHECK(w.device() == g.device(), op, ": token_weight is on ", w.device(), " but g is on ", g.device());
  }
}

at::Tensor weight_grad_with_fisher_cuda(const at::Tensor& g, const at::Tensor& x, int64_t num_samples, double scale,
                                        const std::optional<at::Tensor>& fisher,
                                        const std::optional<at::Tensor>& token_weight, double fisher_scale) {
  check_weight_grad_inputs(g, x, num_samples, fisher, token_weight);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t m = g.size(0), p = g.size(1), q = x.size(1);
  at::Tensor grad = at::empty({p, q}, g.options());
  if (p == 0 || q == 0) return grad;
  const bool has_fisher = fisher.has_value() && fisher->defined();

  mage_kernels::WeightGradArgs args;
  args.dtype = *to_dtype(g.scalar_type());
  args.M = m;
  args.P = p;
  args.Q = q;
  args.g = g.data_ptr();
  args.g_stride_m = g.stride(0);
  args.g_stride_p = g.stride(1);
  args.x = x.data_ptr();
  args.x_stride_m = x.stride(0);
  args.x_stride_q = x.stride(1);
  args.grad = grad.data_ptr();
  args.scale = static_cast<float>(scale);
  args.fisher_scale = static_cast<float>(fisher_scale);
  at::Tensor weight;  // fp32 contiguous copy of token_weight, alive until after the launch
  if (has_fisher) {
    args.fisher = fisher->data_ptr<float>();
    args.fisher_stride_p = fisher->stride(0);
    args.fisher_stride_q = fisher->stride(1);
    args.num_samples = m == 0 ? 1 : num_samples;  // no tokens: nothing to split (any N is accepted)
    if (token_weight.has_value() && token_weight->defined()) {  // the reference ignores it without a Fisher
      weight = token_weight->reshape({m}).to(at::kFloat).contiguous();
      args.token_weight = weight.data_ptr<float>();
    }
  }
  mage_kernels::WeightGradPlan plan;
  C10_CUDA_CHECK(mage_kernels::weight_grad_plan(args, /*num_sms=*/0, &plan));
  at::Tensor workspace;
  if (plan.workspace_bytes > 0)
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes / sizeof(float))}, g.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device().index()).stream();
  C10_CUDA_CHECK(mage_kernels::weight_grad_with_fisher_launch(
      args, plan, workspace.defined() ? workspace.data_ptr() : nullptr, stream));
  return grad;
}

at::Tensor weight_grad_with_fisher_meta(const at::Tensor& g, const at::Tensor& x, int64_t /*num_samples*/,
                                        double /*scale*/, const std::optional<at::Tensor>& /*fisher*/,
                                        const std::optional<at::Tensor>& /*token_weight*/, double /*fisher_scale*/) {
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2, "mage_cuda::weight_grad_with_fisher: g and x must be 2-D");
  return at::empty({g.size(1), x.size(1)}, g.options());
}

}  // namespace

// The schemas must stay identical (up to the namespace) to the Python ops; see
// mage_kernels.cuda_extension.schema_mismatches().
TORCH_LIBRARY(mage_cuda, m) {
  m.def(
      "pema_update_(Tensor[] params, Tensor(a!)[] emas, Tensor[] grads, Tensor[] fishers, float lam, "
      "float beta_fallback) -> Tensor");
  m.def(
      "weight_grad_with_fisher(Tensor g, Tensor x, int num_samples, float scale, Tensor(a!)? fisher, "
      "Tensor? token_weight, float fisher_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mage_cuda, CUDA, m) {
  m.impl("pema_update_", &pema_update_cuda);
  m.impl("weight_grad_with_fisher", &weight_grad_with_fisher_cuda);
}

TORCH_LIBRARY_IMPL(mage_cuda, Meta, m) {
  m.impl("pema_update_", &pema_update_meta);
  m.impl("weight_grad_with_fisher", &weight_grad_with_fisher_meta);
}

// `import mage_kernels._C`: an empty module whose import loads this library.
static struct PyModuleDef mage_kernels_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "CUDA kernels of mage-kernels; importing registers torch.ops.mage_cuda.*", -1, nullptr,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mage_kernels_c_module); }

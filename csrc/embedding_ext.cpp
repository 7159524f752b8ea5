// Every embedding_ext operator schema, in one TORCH_LIBRARY block, and nothing else.
// Kernels are added per dispatch key, one file per op family: cpu/*.cpp (CPU),
// cuda/*.cu (CUDA), autograd.cpp (Autograd); fake kernels are in embedding_ext/ops.py.
// The behaviour contract is docs/SPEC.md.
#include <torch/library.h>

TORCH_LIBRARY(embedding_ext, m) {
  // The lookup as ee.embedding calls it: embedding_forward, with the gradient rule of
  // F.embedding recorded by the Autograd kernel (autograd.cpp): dense or sparse
  // (`sparse`), padding positions dropped (padding_idx < 0: none), 1/count scaling
  // (scale_grad_by_freq).
  m.def(
      "embedding(Tensor weight, Tensor indices, int padding_idx, bool scale_grad_by_freq, "
      "bool sparse) -> Tensor");

  // out[i, :] = weight[indices[i], :]; out has shape indices.shape + (D,), is freshly
  // allocated and contiguous. Any weight dtype; int32 or int64 indices.
  m.def("embedding_forward(Tensor weight, Tensor indices) -> Tensor");

  // Dense gradient of embedding_forward w.r.t. weight: a (num_weights, D) tensor with
  // grad[k] = sum over positions i with indices[i] == k != padding_idx of
  // grad_output[i] (divided by the count of k in indices when scale_grad_by_freq).
  // padding_idx < 0 means "no padding". fp16/bf16 accumulate in fp32. num_weights is a
  // SymInt so the fake kernel can size the output without looking at data.
  m.def(
      "embedding_dense_backward(Tensor grad_output, Tensor indices, SymInt num_weights, "
      "int padding_idx, bool scale_grad_by_freq) -> Tensor");

  // The adjoint of embedding_dense_backward (its derivative w.r.t. grad_output, used for
  // double backward): out[i] = weight[indices[i]] / count, or 0 where indices[i] == padding_idx.
  m.def(
      "embedding_scaled_gather(Tensor weight, Tensor indices, int padding_idx, "
      "bool scale_grad_by_freq) -> Tensor");

  // Sparse gradient pieces: (row_indices (1, nnz) int64, values (nnz, D)) in the row-major
  // order of `indices` with padding positions removed; the caller wraps them in an
  // uncoalesced sparse COO tensor. nnz is data-dependent only when padding_idx >= 0.
  m.def(
      "embedding_sparse_backward(Tensor grad_output, Tensor indices, SymInt num_weights, "
      "int padding_idx, bool scale_grad_by_freq) -> (Tensor, Tensor)");

  // In place: every distinct row referenced by `indices` whose norm_type-norm exceeds
  // max_norm is scaled to max_norm (the rule: renorm_math.h). On the CPU nothing changes
  // if an index is out of range; on CUDA the valid rows of that call are still renormed
  // (the bad id is reported asynchronously).
  m.def(
      "embedding_renorm_(Tensor(a!) weight, Tensor indices, float max_norm, "
      "float norm_type) -> ()");

  // --- The optimizer step fused into the lookup's backward (ee.fuse_optimizer). In place on
  // weight (and the state): each distinct non-padding row k of `indices` gets
  // g = sum of grad_output[i] over the positions i with indices[i] == k (in fp32, fp64 for
  // fp64; divided by the count with scale_grad_by_freq), then one update by `rule`:
  // 0 SGD (w -= lr g), 1 Adagrad (state1 += g^2; w -= lr / (1 + (step - 1) lr_decay) *
  // g / (sqrt(state1) + eps)), 2 SparseAdam (state1, state2 = first and second moments of
  // the touched rows; bias correction by `step`), 3 RowWiseAdagrad (state1 (V,) += mean(g^2);
  // w -= lr g / (sqrt(state1) + eps)). States: the weight's dtype for fp32/fp64, fp32 for
  // fp16/bf16. No gradient tensor is built.
  m.def(
      "embedding_fused_update_(Tensor(a!) weight, Tensor grad_output, Tensor indices, "
      "int padding_idx, bool scale_grad_by_freq, int rule, Tensor(b!)? state1, Tensor(c!)? "
      "state2, float lr, float eps, float beta1, float beta2, float lr_decay, int step) -> ()");

  // --- The pooled lookup (ee.embedding_bag). `indices` is 1-D; `offsets` has B + 1
  // non-decreasing entries starting at 0 (CSR): bag b pools indices[offsets[b]:offsets[b+1]],
  // ids past offsets[B] belong to no bag (but are still range-checked). mode: 0 sum, 1 mean,
  // 2 max. Entries equal to padding_idx (< 0: none) are left out of the pooling and of
  // mean's count. An empty or all-padding bag gives zeros.

  // output (B, D) in weight's dtype, pooled in fp32 (fp64 for fp64); sum mode multiplies
  // each row by per_sample_weights[i] first. arg_max (B, D) int64: for max mode the row
  // each output element came from (the first on ties; -1 for an empty bag), else empty.
  m.def(
      "embedding_bag_forward(Tensor weight, Tensor indices, Tensor offsets, int mode, "
      "Tensor? per_sample_weights, int padding_idx) -> (Tensor output, Tensor arg_max)");

  // Dense gradient w.r.t. weight, (num_weights, D): sum mode adds grad_output[b] *
  // per_sample_weights[i] to row indices[i], mean mode grad_output[b] / count_b, max mode
  // grad_output[b, d] to row arg_max[b, d] only; with scale_grad_by_freq each term is also
  // divided by its row's count over the whole call. CPU: summed in position order
  // (deterministic); CUDA: as embedding_dense_backward (deterministic under
  // torch.use_deterministic_algorithms), max mode with atomics (alerts there, as PyTorch).
  m.def(
      "embedding_bag_dense_backward(Tensor grad_output, Tensor indices, Tensor offsets, "
      "Tensor arg_max, SymInt num_weights, int mode, Tensor? per_sample_weights, "
      "int padding_idx, bool scale_grad_by_freq) -> Tensor");

  // Sparse gradient w.r.t. weight (sum and mean modes), as PyTorch's: (rows (1, nnz) int64,
  // values (nnz, D)) for the ids in bags, in position order, padding entries left out; each
  // value is grad_output[bag] times per_sample_weights[i] (sum) or 1/count_b (mean), and
  // 1/count of its row with scale_grad_by_freq. The caller wraps them in an uncoalesced COO.
  m.def(
      "embedding_bag_sparse_backward(Tensor grad_output, Tensor indices, Tensor offsets, "
      "SymInt num_weights, int mode, Tensor? per_sample_weights, int padding_idx, "
      "bool scale_grad_by_freq) -> (Tensor, Tensor)");

  // Gradient w.r.t. per_sample_weights (sum mode): out[i] = <grad_output[bag of i],
  // weight[indices[i]]>, 0 at padding entries and at ids in no bag.
  m.def(
      "embedding_bag_per_sample_weights_backward(Tensor grad_output, Tensor weight, "
      "Tensor indices, Tensor offsets, int padding_idx) -> Tensor");

  // --- The table-batched pooled lookup (ee.EmbeddingBagCollection): F features, each pooled
  // from table feature_table[f] of `weights` (T tables, any mix of dims, one dtype).
  // `values` holds every id, feature-major; `offsets` has F * B + 1 CSR entries, bag f * B + b
  // being values[offsets[f*B+b]:offsets[f*B+b+1]]. modes[t] (0 sum, 1 mean, 2 max) and
  // padding_idx[t] (< 0: none) are per table, with embedding_bag_forward's rules.

  // output (B, sum of the features' dims) in the tables' dtype, feature f's bag b in row b,
  // columns [col_f, col_f + D_f) (features in order); pooled in fp32 (fp64 for fp64).
  // arg_max (B, sum D) int64 when some table is in max mode: the position in `values` each
  // output element came from (-1: an empty bag, or a sum/mean feature's column), else empty.
  // An id outside its own table's range raises IndexError naming the feature, the table,
  // the id and its position.
  m.def(
      "embedding_bag_collection_forward(Tensor[] weights, Tensor values, Tensor offsets, "
      "int[] feature_table, int[] modes, int[] padding_idx, Tensor? per_sample_weights, "
      "SymInt batch_size) -> (Tensor output, Tensor arg_max)");

  // Dense gradients of every table, (num_weights[t], dims[t]) each, in grad_output's dtype;
  // each table's terms are summed in position order (deterministic).
  m.def(
      "embedding_bag_collection_dense_backward(Tensor grad_output, Tensor values, "
      "Tensor offsets, Tensor arg_max, int[] feature_table, int[] modes, int[] padding_idx, "
      "Tensor? per_sample_weights, SymInt[] num_weights, int[] dims) -> Tensor[]");

  // Sparse gradients of every table: rows[t] (nnz_t,) int64 and values[t] (nnz_t, dims[t]),
  // one entry per non-padding id of the table's features, in position order (max mode: the
  // columns that id did not win are 0). The caller wraps them in uncoalesced COO tensors.
  m.def(
      "embedding_bag_collection_sparse_backward(Tensor grad_output, Tensor values, "
      "Tensor offsets, Tensor arg_max, int[] feature_table, int[] modes, int[] padding_idx, "
      "Tensor? per_sample_weights, SymInt[] num_weights, int[] dims) -> (Tensor[], Tensor[])");

  // The fused optimizer step of every table from grad_output (B, sum D) of
  // embedding_bag_collection_forward (sum/mean tables): each table's rows summed as the
  // sparse gradient's values would be, then the rule of embedding_fused_update_ applied once
  // per row, with that table's state (state1/state2: one per table where the rule keeps
  // state, else empty) and step count (steps[t]). Ids are checked against their tables
  // before any write.
  m.def(
      "embedding_bag_collection_fused_update_(Tensor(a!)[] weights, Tensor grad_output, "
      "Tensor values, Tensor offsets, int[] feature_table, int[] modes, int[] padding_idx, "
      "Tensor? per_sample_weights, int rule, Tensor(b!)[] state1, Tensor(c!)[] state2, "
      "float lr, float eps, float beta1, float beta2, float lr_decay, int[] steps) -> ()");

  // --- Quantized tables, inference only (ee.QuantizedEmbedding, ee.QuantizedEmbeddingBag;
  // docs/quantized.md). `packed` is (V, row_bytes) uint8, one row per embedding; `format`
  // names its layout (csrc/quantized_format.h): "int8" = D codes + fp32 scale + fp32 bias,
  // "int4" = D/2 bytes of two codes (low nibble first) + fp16 scale + fp16 bias (both exactly
  // PyTorch's embedding_bag_byte_prepack / embedding_bag_4bit_prepack rows), "fp8" = D e4m3
  // codes + an fp32 scale. A row dequantizes to scale * code + bias (fp8: scale * code). No
  // gradients: these ops have no Autograd kernel.

  // The rows of a float table (V, D) quantized per row (int8/int4: min/max affine, the codes
  // of PyTorch's prepack ops bit for bit; fp8: amax scaling). CPU only.
  m.def("quantize_rows(Tensor weight, str format) -> Tensor");

  // out[i, :] = dequantized row indices[i], shape indices.shape + (D,), dtype `dtype`
  // (fp32, fp16 or bf16; computed in fp32).
  m.def(
      "quantized_embedding_forward(Tensor packed, str format, Tensor indices, "
      "ScalarType dtype) -> Tensor");

  // embedding_bag_forward's pooling (CSR offsets, modes, padding_idx, empty bags give zeros)
  // over dequantized rows, accumulated in fp32, output (B, D) in `dtype` (fp32, fp16, bf16).
  // per_sample_weights: fp32, sum mode only. No arg_max (no backward).
  m.def(
      "quantized_embedding_bag_forward(Tensor packed, str format, Tensor indices, "
      "Tensor offsets, int mode, Tensor? per_sample_weights, int padding_idx, "
      "ScalarType dtype) -> Tensor");
}

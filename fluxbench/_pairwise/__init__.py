"""Pairwise kernels (private): every N x M computation of fluxbench, without N x M memory.

Modules: :mod:`.common` (the working-dtype rule, autocast off, the two squared-distance
forms), :mod:`.rbf` (RBF kernel, median heuristic), :mod:`.chunked` (chunked U-statistic
sums: MMD, KSD), :mod:`.frames` (local frames), :mod:`.attention` (strategy switch, fused
attention), :mod:`.blocks` (materialised blocks), :mod:`.sums` (the softmax-weighted sums),
:mod:`.triton_attend` and :mod:`.triton_kernels` (the fused Triton kernel, CUDA),
:mod:`.compiled` (opt-in ``torch.compile`` block sums, CPU).
Public faces: :mod:`fluxbench.kernels` and :mod:`fluxbench.pairwise`. Modules import each
other's public names only.

Gaussian-kernel sums over all pairs of two point clouds.

Everything Flux Matching does with a batch reduces to sums of the form

    out_i = sum_j softmax_j( -|z_i - c_j|^2 / (2 var) ) v_j                  (P1)

(posterior means and moments of the smoothed empirical measure, SPEC eq. (5)), their
log-partition functions log sum_j exp(-|z_i - c_j|^2 / (2 var)), and transposed sums
sum_j W_ij g_j of a kernel matrix normalised over its *first* index (SPEC section 2,
step 6).

(P1) is attention with queries z / var, keys c and a per-key bias -|c_j|^2 / (2 var), so
PyTorch's fused ``scaled_dot_product_attention`` kernels do the work on every device
without materialising the N x M matrix. Three details make this exact and accurate:

* **fp32 or better.** Autocast is disabled inside and half precision is promoted to
  float32 (SPEC section 2, known hazards); float64 inputs stay float64.
* **Local frames.** The expanded form z.c / var - |c|^2 / (2 var) cancels when
  |c| >> sqrt(var). Queries are sorted into spatially coherent groups (:class:`Frames`,
  a k-d bisection) and each group is computed in coordinates centred on its own mean, so
  rounding scales with the group radius, not the data radius. The bisection stops as
  soon as the rounding bound is met, so well-conditioned batches use a single frame.
* **Log-partition by a reference key.** Attention is normalised per query, which hides
  the partition function. One extra key whose logit equals that of a known term
  recovers it: Z_i = exp(l_ref) * (mass on the real keys) / (mass on the reference key),
  both masses sums of positive terms (no cancellation). Rows where a mass underflows
  are recomputed densely.

**Two evaluation strategies, the same sums.** Fused attention kernels never hold an
N x M block. Materialised blocks of at most ``_BLOCK`` entries (1 MiB, keys-major, reused)
take the exponential, the dominant cost, once per pair: their logits are the exact
log-kernels -|z - c|^2 / (2 var) <= 0 (no running maximum, no rescaling; held in base 2
for exp2, the cheaper exponential, see :mod:`.common`), clamped at a floor above
the subnormal range (rows of tiny mass are recomputed relative to their maximum), and a
transposed sum of step 6 takes one pass instead of a log-partition pass plus a sum pass.
On CPU, where they are faster (``python -m fluxbench.bench``: the transition sums at
B = 4096, d = 2 take about half the time), blocks do the transposed sums and the means
with at most ``_NARROW`` value columns over at least ``_BLOCKS_MIN_PAIRS`` pairs;
attention does the rest, everything on other devices, and every sum whose inputs require
gradients (blocks write into reused buffers). One exception on every device: a transition
kernel much narrower than the frames were sized for (small t) is beyond the expanded
form's float32 rounding, so its sums always take blocks, with float64 products or
distances in difference form (see ``blocks._EXPANDED_TOL``). :func:`use_attention` forces
either strategy elsewhere (the tests run both).

**Memory linear in the batch, on every device.** Every pass takes its queries in blocks
of :func:`block_rows` rows (at most ``MAX_BLOCK_ENTRIES`` pairs, and at most the caller's
``chunk_size`` rows), so its largest intermediate is (rows, M): nothing N x M is ever
materialised. On CUDA, narrow problems (small d) take a fused Triton kernel, forward and
backward (:mod:`.triton_attend`), which holds no score block at all.

Queries are passed in *frame order* (``frames.permute(z)``, or any subset with the same
number of rows in every group, group after group), so no gather or scatter is needed.
"""

from fluxbench._pairwise.attention import use_attention
from fluxbench._pairwise.chunked import chunk_bounds, chunked_pairwise_matmul, chunked_pairwise_sum
from fluxbench._pairwise.common import (
    LOG2E,
    MAX_BLOCK_ENTRIES,
    block_rows,
    log2_kernel_difference,
    no_autocast,
    sq_dists_difference,
    sq_dists_expanded,
    working_dtype,
)
from fluxbench._pairwise.compiled import use_compiled
from fluxbench._pairwise.frames import Frames, KeyFrame
from fluxbench._pairwise.rbf import median_bandwidth, rbf_kernel, squared_distances
from fluxbench._pairwise.sums import kernel_logsumexp, kernel_mean, kernel_transition_sum, kernel_transpose_sum

__all__ = [
    "working_dtype",
    "no_autocast",
    "sq_dists_expanded",
    "sq_dists_difference",
    "block_rows",
    "MAX_BLOCK_ENTRIES",
    "LOG2E",
    "log2_kernel_difference",
    "squared_distances",
    "rbf_kernel",
    "median_bandwidth",
    "chunk_bounds",
    "chunked_pairwise_sum",
    "chunked_pairwise_matmul",
    "Frames",
    "KeyFrame",
    "kernel_mean",
    "kernel_logsumexp",
    "kernel_transpose_sum",
    "kernel_transition_sum",
    "use_attention",
    "use_compiled",
]

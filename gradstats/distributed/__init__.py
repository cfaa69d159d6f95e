"""Global gradient statistics over torch.distributed: DTensors, sharded and split gradients.

How the gradients can be spread over the ranks, and what gradstats does with each layout:

- Replicated (DDP, or any data parallelism that all-reduces the gradients before the step): every
  rank holds the same full gradients, so the local statistics are the global ones. Nothing to
  pass, no collective.
- DTensor gradients (FSDP2 ``fully_shard``, tensor parallel): found automatically. The statistics
  are taken on the local shards and summed over the mesh dimensions where a gradient is ``Shard``;
  along a ``Replicate`` dimension only the rank at coordinate 0 counts its copy, so replicas are
  counted once. A ``Partial`` gradient is first summed over its ``Partial`` dimensions
  (``redistribute`` to ``Replicate``: one all-reduce of that gradient), since the norm of a sum is
  not the sum of the norms; clipping then scales the local summands, which scales their sum by the
  same factor. Gradients on several meshes are grouped by mesh. Every rank of a mesh must pass the
  same DTensors in the same order, as FSDP2 and tensor parallelism give them. Plain tensors passed
  alongside DTensors are taken as replicated.
- Plain tensors that differ between ranks (ZeRO-style slices, parameters split across ranks,
  pipeline stages): pass ``process_group``, the ranks whose parts make up the whole. The totals
  (norm, NaN/Inf counts, clip coefficient) are global; the per-tensor statistics of plain tensors
  stay those of the local tensor, since ranks may hold different tensors. DTensors may be combined
  with a ``process_group`` (pipeline stages of an FSDP2 model) as long as it shares no rank but
  this one with their meshes; anything else would count them twice and raises.

Collectives, all on the gradients' device, none waiting on the host: one all-reduce (SUM, float64)
per distinct set of reducing process groups (one for FSDP2, HSDP, ZeRO slices, and FSDP2 + tensor
parallel on a mesh over all ranks), one more over ``process_group`` when DTensors are combined with
it, one more (MAX) for the per-tensor inf norms of sharded tensors, and one per ``Partial``
gradient. On gloo (CPU) the calling thread takes part in each collective; on NCCL they are queued
on the device like any kernel (unless TORCH_NCCL_BLOCKING_WAIT=1 makes the host wait).

Numerics. Each rank writes the p-norm of its part into its own slot of the float64 buffer, zeros
elsewhere, so the SUM all-reduce gathers them exactly (x + 0 is x) and every rank combines the same
values in the same order: the total norm and the clip coefficient are bitwise identical on every
rank and from run to run, whatever order the collective adds in. The norms are combined scaled by
the largest, so no power overflows or underflows whatever the norm or p. Counts are summed exactly
(float64 holds integers up to 2^53). Per-tensor norms of a tensor sharded over ranks are summed as
norm^p in float64: exact for norms in about [2^(-1022/p), 2^(1023/p)] (1e-154 to 1e154 for p = 2);
beyond that, possible only for float64 gradients or large p, such a per-tensor norm reads 0 or Inf
while the total norm and the clip coefficient stay right. The norms come back in the local norm
dtype (float32, or float64 where a local gradient is float64): ranks whose gradients differ in that
respect (float64 parameters on some ranks only) compute the coefficient in different dtypes.

Statistics taken inside the gradient reduction (attach: DDP communication hooks, FSDP2
post-accumulate-grad hooks) are described in gradstats.distributed._reduction.
"""

from gradstats.distributed._combine import (
    LocalPart,
    MeshLayout,
    check_combinable,
    check_process_group,
    combine,
    local_part,
    mesh_layout,
    statistics,
)
from gradstats.distributed._reduction import (
    ReductionStats,
    attach,
    attached,
    reduced_statistics,
)

__all__ = [
    "LocalPart",
    "MeshLayout",
    "ReductionStats",
    "attach",
    "attached",
    "check_combinable",
    "check_process_group",
    "combine",
    "local_part",
    "mesh_layout",
    "reduced_statistics",
    "statistics",
]

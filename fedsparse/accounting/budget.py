"""A client's predicted peak memory, and the encoder batch that keeps it within a budget.

A device profile (``fedsparse.profiles``) carries a memory budget: the peak RSS its client
process may reach. Before extracting or training, the client predicts its peak from the
analytic tensor memory of ``fedsparse.accounting.costs`` plus a measured baseline, and fits its
encoder batch to the budget (``fit_encoder_batch``); if even one image per forward would not
fit, it refuses the task with a one-line ``MemoryBudgetError`` (an error reply, counted by the
server), instead of being killed by the operating system.

The model of the peak (bytes)::

    baseline                      the client process after its imports and a training step (measured, below)
    + encoder                     2 x the encoder's parameter bytes + 16 MiB (building, then loading),
                                  + timm's imports for a hub model (``builds_with_timm``);
                                  none where the features are cached
    + threads                     32 MiB per math thread beyond the first (per-thread buffers)
    + max(extraction, training)   the two phases do not overlap:
        extraction = 2 x costs.extraction_tensor_bytes(shape, mask ratio, encoder batch, chunk)
        training   = 2 x costs.head_train_tensor_bytes(slice dims, batch size) + features

The factors of 2 are measured: the allocator and the temporaries of attention (qkv reshapes,
softmax) hold about twice the analytic activations. Measured on this machine in fresh
processes, 500 images of the bundled sample, built-in encoder (fedsparse's own ViT: no timm;
peak RSS, ``VmHWM``; the prediction adds the 22 MiB of Flower's ClientApp imports the measuring
process lacked):

=====================  ==========  ==========
r, dtype, batch        measured    predicted
=====================  ==========  ==========
0.0, fp32, 256          792 MiB     880 MiB
0.5, fp32, 256          707 MiB     766 MiB
0.5, fp32, 32           590 MiB     674 MiB
0.75, bf16, 32          574 MiB     667 MiB
0.75, bf16, 1           617 MiB     661 MiB
=====================  ==========  ==========

(one thread; predicted for the full 192-1024-1024-10 head, batch 64; the measured runs extracted only,
so at small batches the prediction is the training phase's.)
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsparse.accounting.costs import BYTES_PER_FP32, ViTShape, extraction_tensor_bytes, head_train_tensor_bytes

MIB = 2**20
# Peak RSS of a fresh ClientApp process that trains on cached features: ``import
# clients.client_app`` (torch, fedsparse, Flower: 540 MiB) and a training step's first use of
# torch's kernels: 586 MiB measured here for a tiny task (Python 3.11, the default install's
# torch, VmHWM), rounded down to 580 MiB. A task that extracts features with a hub model imports
# timm (and torchvision) too: TIMM_BYTES more (192 MiB measured); the built-in encoder and
# checkpoint files do not (fedsparse.inputs.vit).
LIBRARY_BASELINE_BYTES = 580 * MIB
TIMM_BYTES = 190 * MIB
ENCODER_OVERHEAD_BYTES = 16 * MIB
# A client's whole round (extraction at batch 256 and training) measured 816 MiB with 2 threads
# and 956 MiB with 4 (small and large profiles, tools/bench_profiles.py): the extraction batch
# explains 79 MiB of the 140, the two extra threads the rest.
THREAD_BYTES = 32 * MIB
WORK_FACTOR = 2  # measured peak / analytic tensor bytes of a phase (see the module docstring)


class MemoryBudgetError(ValueError):
    """The task cannot fit the client's memory budget, even at one image per encoder forward."""


def decode_chunk(encoder_batch: int, chunk: int = 512) -> int:
    """Images decoded at a time for ``encoder_batch`` (``fedsparse.inputs.features.batch_and_chunk``)."""
    return encoder_batch * max(1, chunk // encoder_batch)


def predict_peak_bytes(shape: ViTShape, encoder_params: int, mask_ratio: float, encoder_batch: int,
                       head_dims: tuple[int, ...] | list[int], batch_size: int, num_examples: int = 0,
                       baseline: int = LIBRARY_BASELINE_BYTES, threads: int = 1, extracting: bool = True,
                       timm: bool = False) -> int:
    """The predicted peak RSS of a client process (module docstring), in bytes; ``extracting``
    False: its features are cached, so no encoder and no extraction phase; ``timm``: the encoder
    is a hub model, built by timm."""
    threads_bytes = THREAD_BYTES * max(0, threads - 1)
    features = num_examples * shape.dim * BYTES_PER_FP32
    training = WORK_FACTOR * head_train_tensor_bytes(tuple(head_dims), batch_size) + features
    if not extracting:
        return int(baseline + threads_bytes + training)
    encoder = (TIMM_BYTES if timm else 0) + 2 * encoder_params * BYTES_PER_FP32 + ENCODER_OVERHEAD_BYTES + threads_bytes
    extraction = WORK_FACTOR * extraction_tensor_bytes(shape, mask_ratio, encoder_batch, decode_chunk(encoder_batch))
    return int(baseline + encoder + max(extraction, training))


@dataclass(frozen=True)
class BudgetFit:
    """What ``fit_encoder_batch`` decided."""

    encoder_batch: int  # images per encoder forward that fit (<= the one asked for)
    predicted_peak_bytes: int  # at that batch
    shrunk: bool  # smaller than asked for


def fit_encoder_batch(budget_bytes: int, encoder_batch: int, predict) -> BudgetFit:
    """The largest of ``encoder_batch``, its half, its quarter, ... down to 1 whose predicted peak
    (``predict(batch)``) is within ``budget_bytes``; ``MemoryBudgetError`` (one line) when not
    even 1 fits."""
    batch = max(1, int(encoder_batch))
    while True:
        peak = int(predict(batch))
        if peak <= budget_bytes:
            return BudgetFit(batch, peak, batch != encoder_batch)
        if batch == 1:
            raise MemoryBudgetError(
                f"memory budget {budget_bytes / MIB:.0f} MiB is too small: the predicted peak is {peak / MIB:.0f} MiB "
                f"even at 1 image per encoder forward (baseline {LIBRARY_BASELINE_BYTES / MIB:.0f} MiB)")
        batch = max(1, batch // 2)

"""The Triton kernel behind :func:`apt_model.model.dropout.keep_mask` (imported on its first CUDA call)."""

import triton
import triton.language as tl


@triton.jit
def _keep(half_word, threshold):
    return (half_word.to(tl.int32) >= threshold).to(tl.int8)


@triton.jit
def keep_mask_kernel(seed_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
    """``out[i] = u_i >= threshold`` for BLOCK entries per program, ``u_i`` uniform on [0, 2¹⁶): one Philox call
    (four 32-bit words, keyed by the seed, counted by entry group) gives the draws of eight entries."""
    GROUPS: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    counter = (pid * GROUPS + tl.arange(0, GROUPS)).to(tl.uint32)
    seed = tl.load(seed_ptr)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    w0 = r0.to(tl.uint32, bitcast=True)
    w1 = r1.to(tl.uint32, bitcast=True)
    w2 = r2.to(tl.uint32, bitcast=True)
    w3 = r3.to(tl.uint32, bitcast=True)
    # [GROUPS, 2, 2, 2]: entry g * 8 + k takes the k-th 16-bit half-word of group g's four words.
    keep = tl.join(
        tl.join(tl.join(_keep(w0 & 0xFFFF, threshold), _keep(w0 >> 16, threshold)),
                tl.join(_keep(w1 & 0xFFFF, threshold), _keep(w1 >> 16, threshold))),
        tl.join(tl.join(_keep(w2 & 0xFFFF, threshold), _keep(w2 >> 16, threshold)),
                tl.join(_keep(w3 & 0xFFFF, threshold), _keep(w3 >> 16, threshold))),
    )  # fmt: skip
    keep = tl.reshape(keep, [BLOCK])
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, keep, mask=offsets < n)

"""Triton kernels: the autopoietic transform and its masked softmax, forward and backward.

Imported only where Triton is available (see :mod:`apt_model.model.fused_transform`). The transform's work splits
three ways, and each part gets its own grid, so that no program runs more of the chain than it must:

* **row work** (steps 1-7: the head mean, the element MLP, the gate, the row softmaxes of step 6): every entry
  depends only on its own row, so programs take ``RB`` rows of one batch element, grid ``B x row blocks``;
* **per-matrix statistics** (steps 8-12: norms, means, variances, the maximum, the quantiles, the fallback): one
  program per batch element over its whole ``[Lq, Lk]`` tile, which arrives as three float32 maps written by the row
  kernel (``M``, ``T0 = Sg * Fz`` and ``Hm``), so this program does only the statistics;
* **head work** (steps 13-14 and the softmax): grid ``B x H x row blocks``, one head's rows each.

The forward is rows -> statistics -> heads; it keeps ``M``, ``T0``, ``Hm`` and ``base = F - 0.2 M`` (four float32
maps per element, the "work" tensor) and the keys of the quantiles' order statistics (four int32 per element) for
the backward. The backward is heads (the gradient at ``F``, summed over heads) -> statistics (steps 12-8 back: the
gradients at ``T0`` and, from the statistics, at ``M``) -> rows (steps 7-3 back: the full gradient at ``M``) ->
heads (the scores' gradient), and :func:`mlp_param_grad_kernel` sums the element MLP's parameter gradients over
every entry, parallel over entries. The steps follow ``shared/spec/apt-model.md`` and
:func:`apt_model.model.autopoietic.autopoietic_transform` line by line; the backward is that function's autograd
written out, with torch's conventions at the edges (``clamp`` passes the gradient on its bounds, ``amax`` splits it
among ties, ``nan_to_num`` blocks it at non-finite inputs). Two deliberate differences, both within float32 rounding
of the reference or a valid subgradient of it:

* the quantiles are found by bisection on the float bits (the exact order statistics, no sort), and when several
  entries tie with an order statistic the quantile's gradient is split among them evenly (``torch.sort`` hands it to
  one of them);
* sums run in a different order than torch's reductions, and step 13 adds ``0.2 S_h`` to ``F - 0.2 M``.

No atomics: every sum over programs is written as per-program partials and added up by the caller (deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Planes of the forward's saved float32 "work" tensor [B, 4, Lq, Lk], and of the backward's scratch of the same shape
# (constexpr: the only globals a compiled kernel may read; the interpreter would take plain ints).
W_M, W_T0, W_HM, W_BASE = (tl.constexpr(i) for i in range(4))
G_DF, G_DT0, G_DMS, G_DM = (tl.constexpr(i) for i in range(4))


@triton.jit
def _clamp(x, lo, hi):
    # torch.clamp keeps NaN; min/max alone would drop it (and with it the step-12 fallback).
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _within(x, lo, hi):
    # Where torch.clamp's backward lets the gradient through: bounds included.
    return (x >= lo) & (x <= hi)


@triton.jit
def _finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def _sum2(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _clean(x):
    """Step 1: nan_to_num(nan=0, +inf=10, -inf=-10), then clamp to [-15, 15]."""
    y = tl.where(x != x, 0.0, x)
    y = tl.where(y == float("inf"), 10.0, y)
    y = tl.where(y == float("-inf"), -10.0, y)
    return tl.minimum(tl.maximum(y, -15.0), 15.0)


@triton.jit
def _softmax_rows(x, off):
    """Softmax along each row over the entries not ``off``; ``off`` entries and all-``off`` rows give exactly 0."""
    xm = tl.where(off, float("-inf"), x)
    mx = tl.max(xm, axis=1)
    live = mx > float("-inf")
    ex = tl.exp(xm - tl.where(live, mx, 0.0)[:, None])
    den = tl.sum(ex, axis=1)
    return ex / tl.where(live, den, 1.0)[:, None]


@triton.jit
def _head_probs(s_h, base, off):
    """Steps 13-14 for one head's cleaned scores (``base = F - 0.2 M``): the detail sum before the clamp, and the
    probabilities."""
    y = base + 0.2 * s_h
    return y, _softmax_rows(_clamp(y, -15.0, 15.0), off)


@triton.jit
def _head_grad(s_h, base, off, dprobs):
    """The gradient at one head's detail sum (before the clamp), from the gradient at its probabilities."""
    y, probs = _head_probs(s_h, base, off)
    d_out = probs * (dprobs - tl.sum(probs * dprobs, axis=1)[:, None])
    return tl.where(_within(y, -15.0, 15.0), d_out, 0.0)


@triton.jit
def _sort_key(x):
    # Float bits as an int32 whose signed order is the float order (NaN with the sign bit clear sorts last,
    # as in torch.sort).
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(k):
    """Inverse of :func:`_sort_key` (the same xor undoes itself: it leaves the sign bit alone)."""
    bits = k.to(tl.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _add8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, a5 + b5, a6 + b6, a7 + b7


@triton.jit
def _min_max(a0, a1, b0, b1):
    return tl.minimum(a0, b0), tl.maximum(a1, b1)


# Several independent sums or extremes in one reduction (tl.reduce over a tuple) on the GPU; one reduction each
# under Triton's interpreter, which runs a tuple reduction element by element in Python (minutes for the tests).
@triton.jit
def _reduce_min_max(lo, hi, FUSE: tl.constexpr):
    if FUSE:
        r0, r1 = tl.reduce((lo, hi), 0, _min_max)
    else:
        r0, r1 = tl.min(lo, axis=0), tl.max(hi, axis=0)
    return r0, r1


@triton.jit
def _reduce_add2(a, b, FUSE: tl.constexpr):
    if FUSE:
        r0, r1 = tl.reduce((a, b), 0, _add2)
    else:
        r0, r1 = tl.sum(a, axis=0), tl.sum(b, axis=0)
    return r0, r1


@triton.jit
def _reduce_add3(a, b, c, FUSE: tl.constexpr):
    if FUSE:
        r0, r1, r2 = tl.reduce((a, b, c), 0, _add3)
    else:
        r0, r1, r2 = tl.sum(a, axis=0), tl.sum(b, axis=0), tl.sum(c, axis=0)
    return r0, r1, r2


@triton.jit
def _reduce_add8(a0, a1, a2, a3, a4, a5, a6, a7, FUSE: tl.constexpr):
    if FUSE:
        r0, r1, r2, r3, r4, r5, r6, r7 = tl.reduce((a0, a1, a2, a3, a4, a5, a6, a7), 0, _add8)
    else:
        r0, r1, r2, r3 = tl.sum(a0, axis=0), tl.sum(a1, axis=0), tl.sum(a2, axis=0), tl.sum(a3, axis=0)
        r4, r5, r6, r7 = tl.sum(a4, axis=0), tl.sum(a5, axis=0), tl.sum(a6, axis=0), tl.sum(a7, axis=0)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _reduce_stats(mm, tt, m, h, abs_m, FUSE: tl.constexpr):
    if FUSE:
        r0, r1, r2, r3, r4 = tl.reduce((mm, tt, m, h, abs_m), 0, _stats_combine)
    else:
        r0, r1, r2, r3 = tl.sum(mm, axis=0), tl.sum(tt, axis=0), tl.sum(m, axis=0), tl.sum(h, axis=0)
        r4 = tl.max(abs_m, axis=0)
    return r0, r1, r2, r3, r4


@triton.jit
def _reduce_next_order(a0, a1, a2, a3, a4, a5, a6, a7, FUSE: tl.constexpr):
    if FUSE:
        r0, r1, r2, r3, r4, r5, r6, r7 = tl.reduce((a0, a1, a2, a3, a4, a5, a6, a7), 0, _next_order_combine)
    else:
        r0, r1, r2, r3 = tl.max(a0, axis=0), tl.sum(a1, axis=0), tl.min(a2, axis=0), tl.min(a3, axis=0)
        r4, r5, r6, r7 = tl.max(a4, axis=0), tl.sum(a5, axis=0), tl.min(a6, axis=0), tl.min(a7, axis=0)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _order_pairs(key, x, valid, k1, k2, FUSE: tl.constexpr):
    """The k-th and (k+1)-th smallest valid entries (0-based), for k = k1 and k = k2: their keys and values.

    Both searches run in one loop of 32 halvings (the int32 range), and each halving counts for both with one
    reduction: the two counts (each at most the tile size, < 2^15) packed in one int32.
    """
    big = 2147483647
    lo, hi = _reduce_min_max(tl.where(valid, key, big), tl.where(valid, key, -big - 1), FUSE)
    lo1 = lo.to(tl.int64)
    hi1 = hi.to(tl.int64)
    lo2 = lo1
    hi2 = hi1
    # Smallest K with count(key <= K) >= k + 1.
    for _ in range(32):
        mid1 = (lo1 + hi1) >> 1
        mid2 = (lo2 + hi2) >> 1
        packed = tl.sum(
            tl.where(valid & (key <= mid1), 1, 0) + tl.where(valid & (key <= mid2), 65536, 0), axis=0
        )
        enough1 = (packed & 65535) >= k1 + 1
        enough2 = (packed >> 16) >= k2 + 1
        hi1 = tl.where(enough1, mid1, hi1)
        lo1 = tl.where(enough1, lo1, mid1 + 1)
        hi2 = tl.where(enough2, mid2, hi2)
        lo2 = tl.where(enough2, lo2, mid2 + 1)
    # Given the key of the k-th smallest entry: its value, and the key and value of the (k+1)-th (the same entry's
    # when it is tied), for both searches in one reduction.
    below1 = valid & (key <= lo1)
    below2 = valid & (key <= lo2)
    above1 = valid & (key > lo1)
    above2 = valid & (key > lo2)
    v1_lo, n1, k1_next, v1_next, v2_lo, n2, k2_next, v2_next = _reduce_next_order(
        tl.where(below1, x, float("-inf")),
        below1.to(tl.int32),
        tl.where(above1, key, big),
        tl.where(above1, x, float("inf")),
        tl.where(below2, x, float("-inf")),
        below2.to(tl.int32),
        tl.where(above2, key, big),
        tl.where(above2, x, float("inf")),
        FUSE,
    )
    tied1 = n1 >= k1 + 2
    tied2 = n2 >= k2 + 2
    k1_hi = tl.where(tied1, lo1, k1_next.to(tl.int64))
    v1_hi = tl.where(tied1, v1_lo, v1_next)
    k2_hi = tl.where(tied2, lo2, k2_next.to(tl.int64))
    v2_hi = tl.where(tied2, v2_lo, v2_next)
    return lo1, v1_lo, k1_hi, v1_hi, lo2, v2_lo, k2_hi, v2_hi


@triton.jit
def _next_order_combine(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7):
    return (
        tl.maximum(a0, b0), a1 + b1, tl.minimum(a2, b2), tl.minimum(a3, b3),
        tl.maximum(a4, b4), a5 + b5, tl.minimum(a6, b6), tl.minimum(a7, b7),
    )  # fmt: skip


@triton.jit
def _quantile_grad(key, valid, k_lo, k_hi, n_lo, n_hi, frac, g):
    """Gradient of ``v_lo + frac * (v_hi - v_lo)`` (or ``v_lo`` when ``frac == 0``) onto the entries, ties split
    among the ``n_lo`` (``n_hi``) entries with key ``k_lo`` (``k_hi``)."""
    g_lo = tl.where(frac > 0, g * (1.0 - frac), g)
    g_hi = tl.where(frac > 0, g * frac, 0.0)
    return tl.where(valid & (key == k_lo), g_lo / n_lo, 0.0) + tl.where(
        valid & (key == k_hi), g_hi / n_hi, 0.0
    )


@triton.jit
def _row_block(Lq, Lk, AXIS: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr):
    """Row block ``program_id(AXIS)``: its row and column offsets and which entries exist."""
    offs_q = tl.program_id(AXIS) * RB + tl.arange(0, RB)
    offs_k = tl.arange(0, BK)
    valid = (offs_q[:, None] < Lq) & (offs_k[None, :] < Lk)
    return offs_q, offs_k, valid


@triton.jit
def _load_mask(MSK, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        msk = (
            tl.load(MSK + b * sm_b + offs_q[:, None] * sm_q + offs_k[None, :] * sm_k, mask=valid, other=0)
            != 0
        )
    else:
        msk = valid & (offs_q[:, None] < 0)
    return msk


@triton.jit
def _mlp_unit(a0, mlp, psi, W1, B1, W2, j, FINITE: tl.constexpr, NEED_PSI: tl.constexpr):
    """Unit ``j``'s term of step 4's MLP added to ``mlp`` (and its derivative's to ``psi``)."""
    w1j = tl.load(W1 + j).to(tl.float32)
    w2j = tl.load(W2 + j).to(tl.float32)
    z = a0 * w1j + tl.load(B1 + j).to(tl.float32)
    if FINITE:
        # Finite weights (always, in training): a unit's term relu(clamp(z, -5, 5)) is clamp(z, 0, 5), and z is NaN
        # only where A0 is, so the NaN-keeping clamp is not needed per unit: half the instructions, the same numbers.
        mlp += w2j * tl.minimum(tl.maximum(z, 0.0), 5.0)
        if NEED_PSI:  # the unit passes the gradient where 0 < z <= 5 (the clamp's bound included)
            psi += tl.where((z > 0.0) & (z <= 5.0), w2j * w1j, 0.0)
    else:
        # Torch's arithmetic term by term, NaN and inf included (the step-12 fallback depends on it).
        zc = _clamp(z, -5.0, 5.0)
        mlp += w2j * tl.where(zc < 0.0, 0.0, zc)
        if NEED_PSI:  # relu passes where its output is > 0, the clamp on its bounds included
            psi += tl.where((zc > 0.0) & _within(z, -5.0, 5.0), w2j * w1j, 0.0)
    return mlp, psi


@triton.jit
def _mlp_loop(a0, W1, B1, W2, HID: tl.constexpr, FINITE: tl.constexpr, NEED_PSI: tl.constexpr):
    mlp = tl.zeros(a0.shape, dtype=tl.float32)
    psi = tl.zeros(a0.shape, dtype=tl.float32)
    # A plain loop: unrolled (tl.static_range) the row kernels ran 1.4-3.5x slower on the H200 (BENCHMARKS.md).
    for j in range(HID):
        mlp, psi = _mlp_unit(a0, mlp, psi, W1, B1, W2, j, FINITE, NEED_PSI)
    return mlp, psi


@triton.jit
def _mlp(a0, W1, B1, W2, B2, HID: tl.constexpr, HP: tl.constexpr, NEED_PSI: tl.constexpr):
    """Step 4 before its final clamp, ``A_pre = W2 · relu(clamp(W1 · A0 + b1, -5, 5)) + b2``, at each entry; with
    ``NEED_PSI`` also ``psi = dA_pre/dA0 = sum_j w2_j w1_j [unit j passes]``. ``HP``: the hidden size rounded up to
    a power of two."""
    units = tl.arange(0, HP)
    live = units < HID
    w_finite = (
        _finite(tl.load(W1 + units, mask=live, other=0.0))
        & _finite(tl.load(B1 + units, mask=live, other=0.0))
        & _finite(tl.load(W2 + units, mask=live, other=0.0))
    )
    if tl.sum(w_finite.to(tl.int32), axis=0) == HP:
        mlp, psi = _mlp_loop(a0, W1, B1, W2, HID, True, NEED_PSI)
        mlp = tl.where(a0 != a0, a0, mlp)
    else:
        mlp, psi = _mlp_loop(a0, W1, B1, W2, HID, False, NEED_PSI)
    return mlp + tl.load(B2).to(tl.float32), psi


@triton.jit
def _step3_a0(m, e):
    return _clamp(_clamp(m, -8.0, 8.0) * e, -10.0, 10.0)


@triton.jit
def _rows_core(MSK, m, a_pre, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK: tl.constexpr):
    """Steps 5-7 for a block of rows of the head mean ``m``, given step 4's ``A_pre`` there: everything in them
    depends on the entry or its row."""
    msk = _load_mask(MSK, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK)
    a = _clamp(a_pre, -5.0, 5.0)
    # 5. gate
    tay_pre = 1.0 + 2.5 * a
    tay = tl.where(msk, 1.0, _clamp(tay_pre, 0.5, 1.5))
    sg = 1.0 / (1.0 + tl.exp(-tay))
    # 6. row entropy and focus
    p = _softmax_rows(_clamp(m, -10.0, 10.0), ~valid)
    hm = -p * tl.log(p + 1e-6)
    fz = _softmax_rows(3.0 * hm, ~valid)
    # 7. (the energy balance that follows needs the whole matrix)
    t0 = tl.where(valid, sg * fz, 0.0)
    return msk, tay_pre, sg, p, hm, fz, t0


@triton.jit
def _stats_combine(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, tl.maximum(a4, b4)


@triton.jit
def _flat_tile(Lq, Lk, BQ: tl.constexpr, BK: tl.constexpr):
    """A whole ``[Lq, Lk]`` matrix as one flat block: offsets into a contiguous map, and which entries exist.

    The statistics need no row structure, and a flat block reduces in one stage where a 2-D one takes two.
    """
    idx = tl.arange(0, BQ * BK)
    q = idx // BK
    k = idx % BK
    return q * Lk + k, (q < Lq) & (k < Lk)


@triton.jit
def _stats_core(
    m, t0, hm, valid, KEYS, TAU, b, n_f, log_lk, has_ratio, lo25, frac25, lo75, frac75,
    SEARCH: tl.constexpr, FUSE: tl.constexpr,
):  # fmt: skip
    """Steps 8-12 for batch element ``b`` from its whole ``m``, ``t0`` and ``hm`` maps (flat): the shared map ``f``
    and what the backward needs. ``SEARCH``: find the quantiles' order statistics and store their keys in
    ``KEYS[b]`` (forward); otherwise load them from there (backward: the same F, so the same entries). ``FUSE``:
    independent reductions as one (see ``_reduce_stats``).

    The per-matrix sums that do not depend on each other share one reduction (one pass of the block's threads
    through shared memory): the program is a chain of dependent reductions, and their number sets its time.
    """
    mv = tl.where(valid, m, 0.0)
    hv = tl.where(valid, hm, 0.0)
    sum_mm, sum_tt, sum_m, sum_hm, r_pre = tl.reduce(
        (mv * mv, t0 * t0, mv, hv, tl.abs(mv)), 0, _stats_combine
    )
    # 8. energy balance
    nm = tl.sqrt(sum_mm)
    nt = tl.sqrt(sum_tt)
    c_pre = (nm + 1e-4) / (nt + 1e-4)
    c = _clamp(c_pre, 0.8, 1.2)
    t = c * t0
    # 9. spread matching
    om = sum_m / n_f
    mc = tl.where(valid, m - om, 0.0)
    sum_t, sum_mc2 = _reduce_add2(t, mc * mc, FUSE)
    tm = sum_t / n_f
    tc = tl.where(valid, t - tm, 0.0)
    tv_pre = tl.sum(tc * tc, axis=0) / n_f
    ov_pre = sum_mc2 / n_f
    tv = tl.maximum(tv_pre, 1e-2)
    ov = tl.maximum(ov_pre, 1e-2)
    g_pre = tl.sqrt(ov) / tl.sqrt(tv)
    g = _clamp(g_pre, 0.8, 1.2)
    big_r = _clamp(r_pre, 1.0, 10.0)
    mix_pre = 0.3 / tl.log(1.0 + big_r)
    mix = _clamp(mix_pre, 0.1, 0.5)
    kappa = mix * g
    tp = tm + kappa * (t - tm)
    # 10. entropy mix with M
    ratio_pre = tl.where(has_ratio > 0.5, (sum_hm / n_f) / log_lk, 0.0)
    r = 0.4 + _clamp(ratio_pre, 0.0, 0.4)
    f1 = tl.where(valid, (1.0 - r) * tp + r * m, 0.0)
    # 11. IQR-adaptive temperature
    key = _sort_key(f1)
    if SEARCH:
        k25lo, v25lo, k25hi, v25hi, k75lo, v75lo, k75hi, v75hi = _order_pairs(
            key, f1, valid, lo25, lo75, FUSE
        )
        tl.store(KEYS + b * 4, k25lo.to(tl.int32))
        tl.store(KEYS + b * 4 + 1, k25hi.to(tl.int32))
        tl.store(KEYS + b * 4 + 2, k75lo.to(tl.int32))
        tl.store(KEYS + b * 4 + 3, k75hi.to(tl.int32))
    else:
        k25lo = tl.load(KEYS + b * 4).to(tl.int64)
        k25hi = tl.load(KEYS + b * 4 + 1).to(tl.int64)
        k75lo = tl.load(KEYS + b * 4 + 2).to(tl.int64)
        k75hi = tl.load(KEYS + b * 4 + 3).to(tl.int64)
        v25lo = _key_value(k25lo)
        v25hi = _key_value(k25hi)
        v75lo = _key_value(k75lo)
        v75hi = _key_value(k75hi)
    q25 = tl.where(frac25 > 0, v25lo + frac25 * (v25hi - v25lo), v25lo)
    q75 = tl.where(frac75 > 0, v75lo + frac75 * (v75hi - v75lo), v75lo)
    iqr = q75 - q25
    iqc = _clamp(iqr, 0.5, 5.0)
    tau_raw = tl.load(TAU).to(tl.float32)
    tau0 = _clamp(tau_raw, 1.0, 1.5)
    temp_pre = tau0 * (1.0 + 0.1 * tl.log(1.0 + iqc))
    temp = _clamp(temp_pre, 1.0, 2.0)
    f2_pre = f1 / temp
    f2 = _clamp(f2_pre, -15.0, 15.0)
    # 12. fallback to M when over 20% of F is not finite
    finite = _finite(f2)
    bad = (tl.sum(tl.where(valid & ~finite, 1.0, 0.0), axis=0) / n_f) > 0.2
    f = tl.where(bad, _clamp(m, -10.0, 10.0), _clamp(tl.where(f2 != f2, 0.0, f2), -10.0, 10.0))
    return (
        nm, nt, c_pre, c, tc, mc, tv_pre, ov_pre, tv, ov, g_pre, g, r_pre, big_r, mix_pre, mix, kappa, tp,
        ratio_pre, r, f1, key, k25lo, k25hi, k75lo, k75hi, iqr, iqc, tau_raw, tau0, temp_pre, temp, f2_pre, f2,
        finite, bad, f,
    )  # fmt: skip


# Lengths, strides and quantile ranks are not specialised on (divisibility by 16, == 1): decoding visits many lengths,
# and each specialisation would be another compilation; the tile sizes alone select the code.
_SHAPE = ("Lq", "Lk", "n_e")
_SCORES = ("H", "ss_b", "ss_h", "ss_q", "ss_k")
_MASK = ("sm_b", "sm_q", "sm_k")


@triton.jit(do_not_specialize=[*_SHAPE, *_SCORES, *_MASK])
def rows_fwd_kernel(
    S, MSK, WORK, SAVED, W1, B1, W2, B2, Lq, Lk, n_e, H, ss_b, ss_h, ss_q, ss_k, sm_b, sm_q, sm_k, e,
    HID: tl.constexpr, HP: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SAVE_MLP: tl.constexpr,
):  # fmt: skip
    """Steps 1-7 for ``RB`` rows of element ``program_id(0)``: writes ``M``, ``T0`` and ``Hm``; with ``SAVE_MLP``
    also step 4's ``A_pre`` and derivative ``psi`` (planes 0, 1 of ``SAVED``), which spares the backward its pass
    over the MLP's units."""
    b = tl.program_id(0).to(tl.int64)
    offs_q, offs_k, valid = _row_block(Lq, Lk, 1, RB, BK)
    s_ptrs = S + b * ss_b + offs_q[:, None] * ss_q + offs_k[None, :] * ss_k
    # 1-2. clean each head's scores, mean over heads
    acc = tl.zeros((RB, BK), dtype=tl.float32)
    for h in range(H):
        acc += _clean(tl.load(s_ptrs + h * ss_h, mask=valid, other=0.0).to(tl.float32))
    # Masked entries are -inf in the spec's input whatever the scores hold there: -10 after step 1, in every head.
    m = tl.where(_load_mask(MSK, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK), -10.0, acc / H)
    a_pre, psi = _mlp(_step3_a0(m, e), W1, B1, W2, B2, HID, HP, SAVE_MLP)
    _msk, _tay_pre, _sg, _p, hm, _fz, t0 = _rows_core(
        MSK, m, a_pre, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK
    )  # fmt: skip
    w_ptrs = WORK + b * 4 * n_e + offs_q[:, None] * Lk + offs_k[None, :]
    tl.store(w_ptrs + W_M * n_e, m, mask=valid)
    tl.store(w_ptrs + W_T0 * n_e, t0, mask=valid)
    tl.store(w_ptrs + W_HM * n_e, hm, mask=valid)
    if SAVE_MLP:
        saved_ptrs = SAVED + b * 2 * n_e + offs_q[:, None] * Lk + offs_k[None, :]
        tl.store(saved_ptrs, a_pre, mask=valid)
        tl.store(saved_ptrs + n_e, psi, mask=valid)


@triton.jit(do_not_specialize=[*_SHAPE, "lo25", "lo75"])
def stats_fwd_kernel(
    WORK, KEYS, TAU, Lq, Lk, n_e, n_f, log_lk, has_ratio, lo25, frac25, lo75, frac75,
    BQ: tl.constexpr, BK: tl.constexpr, FUSE: tl.constexpr,
):  # fmt: skip
    """Steps 8-12 for element ``program_id(0)``: stores ``base = F - 0.2 M`` and the quantiles' keys."""
    b = tl.program_id(0).to(tl.int64)
    offs, valid = _flat_tile(Lq, Lk, BQ, BK)
    w_ptrs = WORK + b * 4 * n_e + offs
    m = tl.load(w_ptrs + W_M * n_e, mask=valid, other=0.0)
    t0 = tl.load(w_ptrs + W_T0 * n_e, mask=valid, other=0.0)
    hm = tl.load(w_ptrs + W_HM * n_e, mask=valid, other=0.0)
    stats = _stats_core(
        m, t0, hm, valid, KEYS, TAU, b, n_f, log_lk, has_ratio, lo25, frac25, lo75, frac75, True, FUSE
    )  # fmt: skip
    f = stats[-1]
    tl.store(w_ptrs + W_BASE * n_e, f - 0.2 * m, mask=valid)


@triton.jit(do_not_specialize=[*_SHAPE, *_SCORES, *_MASK, "sp_b", "sp_h", "sp_q"])
def heads_fwd_kernel(
    S, MSK, WORK, P, Lq, Lk, n_e, H, ss_b, ss_h, ss_q, ss_k, sm_b, sm_q, sm_k, sp_b, sp_h, sp_q,
    RB: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Steps 13-14 and the masked softmax for ``RB`` rows of head ``program_id(1)`` of element ``program_id(0)``."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_q, offs_k, valid = _row_block(Lq, Lk, 2, RB, BK)
    off = _load_mask(MSK, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK) | ~valid
    base = tl.load(
        WORK + b * 4 * n_e + W_BASE * n_e + offs_q[:, None] * Lk + offs_k[None, :], mask=valid, other=0.0
    )
    s_ptrs = S + b * ss_b + h * ss_h + offs_q[:, None] * ss_q + offs_k[None, :] * ss_k
    s_h = tl.where(off, -10.0, _clean(tl.load(s_ptrs, mask=valid, other=0.0).to(tl.float32)))
    _y, probs = _head_probs(s_h, base, off)
    p_ptrs = P + b * sp_b + h * sp_h + offs_q[:, None] * sp_q + offs_k[None, :]
    tl.store(p_ptrs, probs.to(P.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=[*_SHAPE, *_SCORES, *_MASK, "sg_b", "sg_h", "sg_q", "sg_k"])
def heads_bwd_kernel(
    S, MSK, WORK, DP, GRADS, Lq, Lk, n_e, H, ss_b, ss_h, ss_q, ss_k, sm_b, sm_q, sm_k, sg_b, sg_h, sg_q, sg_k,
    RB: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """14-13 back for ``RB`` rows of element ``program_id(0)``: the gradient at ``F``, summed over the heads."""
    b = tl.program_id(0).to(tl.int64)
    offs_q, offs_k, valid = _row_block(Lq, Lk, 1, RB, BK)
    off = _load_mask(MSK, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK) | ~valid
    e_ptrs = b * 4 * n_e + offs_q[:, None] * Lk + offs_k[None, :]
    base = tl.load(WORK + e_ptrs + W_BASE * n_e, mask=valid, other=0.0)
    s_ptrs = S + b * ss_b + offs_q[:, None] * ss_q + offs_k[None, :] * ss_k
    g_ptrs = DP + b * sg_b + offs_q[:, None] * sg_q + offs_k[None, :] * sg_k
    df = tl.zeros((RB, BK), dtype=tl.float32)
    for h in range(H):
        s_h = tl.where(off, -10.0, _clean(tl.load(s_ptrs + h * ss_h, mask=valid, other=0.0).to(tl.float32)))
        df += _head_grad(s_h, base, off, tl.load(g_ptrs + h * sg_h, mask=valid, other=0.0).to(tl.float32))
    tl.store(GRADS + e_ptrs + G_DF * n_e, df, mask=valid)


@triton.jit(do_not_specialize=[*_SHAPE, "lo25", "lo75"])
def stats_bwd_kernel(
    WORK, GRADS, KEYS, TAU, DTAU, DHM, Lq, Lk, n_e, n_f, log_lk, has_ratio, lo25, frac25, lo75, frac75,
    BQ: tl.constexpr, BK: tl.constexpr, FUSE: tl.constexpr,
):  # fmt: skip
    """Steps 12-8 back for element ``program_id(0)``: the gradients at ``T0`` and, through the statistics and step
    13's ``-0.2 M``, at ``M``; the mean entropy's gradient (one number per element, ``DHM``) and ``tau``'s share."""
    b = tl.program_id(0).to(tl.int64)
    offs, valid = _flat_tile(Lq, Lk, BQ, BK)
    e_ptrs = b * 4 * n_e + offs
    m = tl.load(WORK + e_ptrs + W_M * n_e, mask=valid, other=0.0)
    t0 = tl.load(WORK + e_ptrs + W_T0 * n_e, mask=valid, other=0.0)
    hm = tl.load(WORK + e_ptrs + W_HM * n_e, mask=valid, other=0.0)
    df = tl.load(GRADS + e_ptrs + G_DF * n_e, mask=valid, other=0.0)
    (
        nm, nt, c_pre, c, tc, mc, tv_pre, ov_pre, tv, ov, g_pre, g, r_pre, big_r, mix_pre, mix, kappa, tp,
        ratio_pre, r, f1, key, k25lo, k25hi, k75lo, k75hi, iqr, iqc, tau_raw, tau0, temp_pre, temp, f2_pre, f2,
        finite, bad, _f,
    ) = _stats_core(
        m, t0, hm, valid, KEYS, TAU, b, n_f, log_lk, has_ratio, lo25, frac25, lo75, frac75, False, FUSE
    )  # fmt: skip
    # 13: F - 0.2 M
    dm = -0.2 * df
    # 12
    dm += tl.where(bad, tl.where(_within(m, -10.0, 10.0), df, 0.0), 0.0)
    df2 = tl.where(bad, 0.0, tl.where(finite & _within(f2, -10.0, 10.0), df, 0.0))
    # 11, with every sum that needs only what is known by now (ties at the order statistics, at max |M|, and the
    # centred maps' sums of step 9) in the same reduction
    df2p = tl.where(_within(f2_pre, -15.0, 15.0), df2, 0.0)
    is_max = valid & (tl.abs(m) == r_pre)
    sum_df2p_f1, n75lo, n75hi, n25lo, n25hi, n_max, sum_tc, sum_mc = _reduce_add8(
        df2p * f1,
        tl.where(valid & (key == k75lo), 1.0, 0.0),
        tl.where(valid & (key == k75hi), 1.0, 0.0),
        tl.where(valid & (key == k25lo), 1.0, 0.0),
        tl.where(valid & (key == k25hi), 1.0, 0.0),
        tl.where(is_max, 1.0, 0.0),
        tc,
        mc,
        FUSE,
    )
    df1 = df2p / temp
    dtemp = -sum_df2p_f1 / (temp * temp)
    dtemp_pre = tl.where(_within(temp_pre, 1.0, 2.0), dtemp, 0.0)
    dtau = tl.where(_within(tau_raw, 1.0, 1.5), dtemp_pre * (1.0 + 0.1 * tl.log(1.0 + iqc)), 0.0)
    diqr = tl.where(_within(iqr, 0.5, 5.0), dtemp_pre * tau0 * 0.1 / (1.0 + iqc), 0.0)
    df1 += _quantile_grad(key, valid, k75lo, k75hi, n75lo, n75hi, frac75, diqr)
    df1 += _quantile_grad(key, valid, k25lo, k25hi, n25lo, n25hi, frac25, -diqr)
    # 10
    dtp = tl.where(valid, df1 * (1.0 - r), 0.0)
    dm += df1 * r
    dr, dkappa, sum_dtp = _reduce_add3(tl.where(valid, df1 * (m - tp), 0.0), dtp * tc, dtp, FUSE)
    d_hmean = tl.where((has_ratio > 0.5) & _within(ratio_pre, 0.0, 0.4), dr / log_lk, 0.0)
    # 9
    dt = dtp * kappa
    dtm = sum_dtp * (1.0 - kappa)
    dmix = dkappa * g
    dg = dkappa * mix
    log_r = tl.log(1.0 + big_r)
    dbig_r = tl.where(_within(mix_pre, 0.1, 0.5), dmix * -0.3 / (log_r * log_r) / (1.0 + big_r), 0.0)
    dr_pre = tl.where(_within(r_pre, 1.0, 10.0), dbig_r, 0.0)
    sign_m = tl.where(m > 0, 1.0, tl.where(m < 0, -1.0, 0.0))
    dm += tl.where(is_max, dr_pre / n_max * sign_m, 0.0)
    dg_pre = tl.where(_within(g_pre, 0.8, 1.2), dg, 0.0)
    sqrt_ov = tl.sqrt(ov)
    sqrt_tv = tl.sqrt(tv)
    dov = dg_pre / sqrt_tv / (2.0 * sqrt_ov)
    dtv = -dg_pre * sqrt_ov / (sqrt_tv * sqrt_tv) / (2.0 * sqrt_tv)
    dtv_pre = tl.where(tv_pre >= 1e-2, dtv, 0.0)
    dov_pre = tl.where(ov_pre >= 1e-2, dov, 0.0)
    dt += dtv_pre * 2.0 * tc / n_f
    dtm -= dtv_pre * 2.0 * sum_tc / n_f
    dm += dov_pre * 2.0 * mc / n_f
    dom = -dov_pre * 2.0 * sum_mc / n_f
    dt = tl.where(valid, dt + dtm / n_f, 0.0)
    dm += dom / n_f
    # 8
    dt0 = dt * c
    dc_pre = tl.where(_within(c_pre, 0.8, 1.2), tl.sum(dt * t0, axis=0), 0.0)
    dnm = dc_pre / (nt + 1e-4)
    dnt = -dc_pre * (nm + 1e-4) / ((nt + 1e-4) * (nt + 1e-4))
    dm += tl.where(nm > 0, dnm / tl.where(nm > 0, nm, 1.0), 0.0) * m
    dt0 += tl.where(nt > 0, dnt / tl.where(nt > 0, nt, 1.0), 0.0) * t0
    tl.store(GRADS + e_ptrs + G_DT0 * n_e, dt0, mask=valid)
    tl.store(GRADS + e_ptrs + G_DMS * n_e, dm, mask=valid)
    tl.store(DHM + b, d_hmean / n_f)
    tl.store(DTAU + b, dtau)


@triton.jit(do_not_specialize=[*_SHAPE, *_MASK])
def rows_bwd_kernel(
    MSK, WORK, SAVED, GRADS, DHM, A0, DA, DB2, W1, B1, W2, B2, Lq, Lk, n_e, H, sm_b, sm_q, sm_k, e,
    HID: tl.constexpr, HP: tl.constexpr, RB: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
    SAVED_MLP: tl.constexpr,
):  # fmt: skip
    """Steps 7-2 back for ``RB`` rows of element ``program_id(0)``: the full gradient at ``M`` over ``H`` (each
    head's share of the mean), and the MLP's input ``A0`` and output gradient for its parameters' sums. Step 4's
    ``A_pre`` and ``psi`` come from ``SAVED`` (``SAVED_MLP``) or are recomputed."""
    b = tl.program_id(0).to(tl.int64)
    offs_q, offs_k, valid = _row_block(Lq, Lk, 1, RB, BK)
    e_ptrs = b * 4 * n_e + offs_q[:, None] * Lk + offs_k[None, :]
    m = tl.load(WORK + e_ptrs + W_M * n_e, mask=valid, other=0.0)
    dt0 = tl.load(GRADS + e_ptrs + G_DT0 * n_e, mask=valid, other=0.0)
    dm = tl.load(GRADS + e_ptrs + G_DMS * n_e, mask=valid, other=0.0)
    a0 = _step3_a0(m, e)
    if SAVED_MLP:
        saved_ptrs = SAVED + b * 2 * n_e + offs_q[:, None] * Lk + offs_k[None, :]
        a_pre = tl.load(saved_ptrs, mask=valid, other=0.0)
        psi = tl.load(saved_ptrs + n_e, mask=valid, other=0.0)
    else:
        a_pre, psi = _mlp(a0, W1, B1, W2, B2, HID, HP, True)
    msk, tay_pre, sg, p, _hm, fz, _t0 = _rows_core(
        MSK, m, a_pre, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK
    )
    # 7
    dsg = dt0 * fz
    dfz = dt0 * sg
    # 6 (and step 10's mean entropy, the same share for every entry)
    dhm = tl.where(valid, tl.load(DHM + b), 0.0) + 3.0 * fz * (dfz - tl.sum(fz * dfz, axis=1)[:, None])
    dp = tl.where(valid, dhm * -(tl.log(p + 1e-6) + p / (p + 1e-6)), 0.0)
    dmc = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    dm += tl.where(_within(m, -10.0, 10.0), dmc, 0.0)
    # 5
    dtay = tl.where(msk | ~valid, 0.0, dsg * sg * (1.0 - sg))
    da_pre = tl.where(_within(tay_pre, 0.5, 1.5) & _within(a_pre, -5.0, 5.0), 2.5 * dtay, 0.0)
    # 4. dA0 through the MLP here; its parameters' gradients are sums over every entry of the batch, made in
    # mlp_param_grad_kernel (parallel over entries) from the A0 and dA_pre written out here.
    tl.store(DB2 + b * tl.num_programs(1) + tl.program_id(1), _sum2(da_pre))
    flat = b * n_e + offs_q[:, None] * Lk + offs_k[None, :]
    tl.store(A0 + flat, a0, mask=valid)
    tl.store(DA + flat, da_pre, mask=valid)
    # 3
    dm += tl.where(_within(m, -8.0, 8.0), da_pre * psi * e, 0.0)
    tl.store(GRADS + e_ptrs + G_DM * n_e, dm / H, mask=valid)


@triton.jit(
    do_not_specialize=[*_SHAPE, *_SCORES, *_MASK, "sg_b", "sg_h", "sg_q", "sg_k", "sd_b", "sd_h", "sd_q"]
)
def scores_bwd_kernel(
    S, MSK, WORK, DP, GRADS, DS, Lq, Lk, n_e, H, ss_b, ss_h, ss_q, ss_k, sm_b, sm_q, sm_k,
    sg_b, sg_h, sg_q, sg_k, sd_b, sd_h, sd_q,
    RB: tl.constexpr, BK: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Steps 13 and 2-1 back for ``RB`` rows of head ``program_id(1)``: the head's own share (``0.2 dy``,
    recomputed rather than kept from the first pass) plus its share of the mean's, onto its raw scores."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_q, offs_k, valid = _row_block(Lq, Lk, 2, RB, BK)
    off = _load_mask(MSK, b, offs_q, offs_k, valid, sm_b, sm_q, sm_k, HAS_MASK) | ~valid
    e_ptrs = b * 4 * n_e + offs_q[:, None] * Lk + offs_k[None, :]
    base = tl.load(WORK + e_ptrs + W_BASE * n_e, mask=valid, other=0.0)
    dm_h = tl.load(GRADS + e_ptrs + G_DM * n_e, mask=valid, other=0.0)
    x = tl.load(
        S + b * ss_b + h * ss_h + offs_q[:, None] * ss_q + offs_k[None, :] * ss_k, mask=valid, other=0.0
    )
    x = x.to(tl.float32)
    dprobs = tl.load(
        DP + b * sg_b + h * sg_h + offs_q[:, None] * sg_q + offs_k[None, :] * sg_k, mask=valid, other=0.0
    )
    ds = 0.2 * _head_grad(tl.where(off, -10.0, _clean(x)), base, off, dprobs.to(tl.float32)) + dm_h
    passes = (x == x) & _within(x, -15.0, 15.0) & ~off  # finite, not clamped, not masked (a constant -inf)
    d_ptrs = DS + b * sd_b + h * sd_h + offs_q[:, None] * sd_q + offs_k[None, :]
    tl.store(d_ptrs, tl.where(passes, ds, 0.0).to(DS.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["n_elem"])
def mlp_param_grad_kernel(
    A0, DA, W1, B1, W2, DW1, DB1, DW2, n_elem, HID: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr
):
    """Step 4's parameter gradients over ``BLOCK`` entries: ``[BLOCK, HID]`` tiles, summed over the entries.

    Each output is ``[HP, programs]``: unit-major, so that the sum over programs that follows runs along
    contiguous memory (the program-major layout made that sum 21 us, a third of this kernel)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elem
    a0 = tl.load(A0 + offs, mask=ok, other=0.0)
    da = tl.load(DA + offs, mask=ok, other=0.0)  # 0 past the end: no contribution
    units = tl.arange(0, HP)
    live = units < HID
    w1 = tl.load(W1 + units, mask=live, other=0.0).to(tl.float32)
    b1 = tl.load(B1 + units, mask=live, other=0.0).to(tl.float32)
    w2 = tl.load(W2 + units, mask=live, other=0.0).to(tl.float32)
    z = a0[:, None] * w1[None, :] + b1[None, :]
    out = units.to(tl.int64) * tl.num_programs(0) + pid
    finite = _finite(w1) & _finite(b1) & _finite(w2)
    if tl.sum(finite.to(tl.int32), axis=0) == HP:
        # Finite weights (always, in training), and A0 is finite (a clamped mean of cleaned scores): relu(clamp(z))
        # is min(max(z, 0), 5) and w2 comes out of the sums — about half the instructions per entry and unit.
        tl.store(DW2 + out, tl.sum(da[:, None] * tl.minimum(tl.maximum(z, 0.0), 5.0), axis=0))
        passes = (z > 0.0) & (z <= 5.0)
        tl.store(DW1 + out, w2 * tl.sum(tl.where(passes, (da * a0)[:, None], 0.0), axis=0))
        tl.store(DB1 + out, w2 * tl.sum(tl.where(passes, da[:, None], 0.0), axis=0))
    else:
        zc = _clamp(z, -5.0, 5.0)
        tl.store(DW2 + out, tl.sum(da[:, None] * tl.where(zc < 0.0, 0.0, zc), axis=0))
        dz = tl.where((zc > 0.0) & _within(z, -5.0, 5.0), da[:, None] * w2[None, :], 0.0)
        tl.store(DW1 + out, tl.sum(dz * a0[:, None], axis=0))
        tl.store(DB1 + out, tl.sum(dz, axis=0))

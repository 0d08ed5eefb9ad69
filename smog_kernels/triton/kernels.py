"""Triton kernels of the grouping step. Launch logic lives in smog_kernels.triton.ops.

Every kernel accumulates in float32 and reads its inputs through explicit strides, so views need no
copy. None of them holds an N x K buffer: the score tiles live in registers only.

Conventions: BM = row (sample) tile, BN = group tile, BD = feature tile (the whole padded D).
PRECISION is the tl.dot input precision ("ieee" or "tf32"; ignored for 16-bit inputs).
"""
from __future__ import annotations

import triton
import triton.language as tl

# (Kernels use literals: Triton only lets jit code read module globals declared tl.constexpr.)
# Sizes that vary from call to call (N, K, T, split sizes) are not specialised (do_not_specialize),
# so that new batch or group counts reuse the compiled kernels; D and the strides are (unit
# feature strides become constants and allow vector loads).


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with float32 accumulation. UPCAST (set under the interpreter for bfloat16 inputs, whose
    numpy emulation multiplies the raw uint16 storage) widens both operands first; products of
    16-bit values are exact in float32, so the result is the same up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_scores(q, c_ptr, cols, d, d_ok, K, stride_ck, stride_cd,
                 EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(scores [BM, BN] = q @ c.T with columns past K at -inf, the group tile c [BN, BD]) for the
    group rows `cols`: the inner step shared by the assignment and the loss."""
    if EVEN_K:
        c = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
                    mask=d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(c), PRECISION, UPCAST)
    else:
        col_ok = cols < K
        c = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.where(col_ok[None, :], _dot(q, tl.trans(c), PRECISION, UPCAST), float("-inf"))
    return s, c


@triton.jit
def _operand(v, like, UPCAST: tl.constexpr):
    """float32 probabilities rounded to the dtype of `like` for the second product. Under UPCAST the
    rounding to bfloat16 (round to nearest even, as on the GPU; the interpreter's own cast truncates)
    is done on the bits and the value stays float32."""
    if UPCAST:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(like.dtype)


# ---- assignment: running (max, argmax) over group tiles ------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "tiles_per_split", "stats_from"])
def assign_kernel(
    x_ptr, c_ptr, val_ptr, idx_ptr, sums_ptr, counts_ptr,
    N, K, D, tiles_per_split, stats_from,
    stride_xn, stride_xd, stride_ck, stride_cd, stride_sk,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, STATS: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Program (row block m, split s) scans group tiles [s*tiles_per_split, (s+1)*tiles_per_split)
    and writes its best (score, index) per row to val/idx[s, row]. Ties keep the smallest k: a tile
    only replaces the running best on a strictly larger score, and inside a tile the smallest k among
    the maximal columns wins. With STATS (only launched with one split) the rows >= stats_from are
    also added to sums/counts of their group by atomics. EVEN_K: K is a multiple of BN."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    d = tl.arange(0, BD)
    d_ok = d < D
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xn + d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    best = tl.full([BM], float("-inf"), tl.float32)
    best_idx = tl.zeros([BM], tl.int32)
    k_begin = pid_s * tiles_per_split * BN
    k_stop = tl.minimum(k_begin + tiles_per_split * BN, K)
    for k0 in range(k_begin, k_stop, BN):
        cols = k0 + tl.arange(0, BN)
        s, c = _tile_scores(x, c_ptr, cols, d, d_ok, K, stride_ck, stride_cd, EVEN_K, PRECISION, UPCAST)
        m = tl.max(s, 1)
        am = tl.min(tl.where(s == m[:, None], cols[None, :], 2147483647), 1)
        better = m > best
        best = tl.where(better, m, best)
        best_idx = tl.where(better, am, best_idx)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(val_ptr + out, best, mask=row_ok)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=row_ok)
    if STATS:
        take = row_ok & (rows >= stats_from)
        target = best_idx.to(tl.int64)
        # reloaded (from L2) rather than kept live through the loop: fewer registers
        xs = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xn + d[None, :] * stride_xd,
                     mask=take[:, None] & d_ok[None, :], other=0.0)
        tl.atomic_add(sums_ptr + target[:, None] * stride_sk + d[None, :], xs.to(tl.float32),
                      mask=take[:, None] & d_ok[None, :], sem="relaxed")
        tl.atomic_add(counts_ptr + target, tl.full([BM], 1, tl.int64), mask=take, sem="relaxed")


@triton.jit(do_not_specialize=["N", "SPLIT", "stats_from"])
def assign_merge_kernel(
    val_ptr, idx_ptr, score_ptr, index_ptr, x_ptr, sums_ptr, counts_ptr,
    N, D, SPLIT, stats_from, stride_xn, stride_xd, stride_sk,
    BM: tl.constexpr, BD: tl.constexpr, STATS: tl.constexpr,
):
    """Merges the per-split bests in split order (strictly larger wins, so ties keep the smaller k,
    which lives in the earlier split); optionally adds rows >= stats_from to the statistics."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < N
    best = tl.full([BM], float("-inf"), tl.float32)
    best_idx = tl.zeros([BM], tl.int64)
    for s in range(0, SPLIT):
        v = tl.load(val_ptr + s * N + rows, mask=row_ok, other=float("-inf"))
        i = tl.load(idx_ptr + s * N + rows, mask=row_ok, other=0)
        better = v > best
        best = tl.where(better, v, best)
        best_idx = tl.where(better, i, best_idx)
    tl.store(score_ptr + rows, best, mask=row_ok)
    tl.store(index_ptr + rows, best_idx, mask=row_ok)
    if STATS:
        take = row_ok & (rows >= stats_from)
        d = tl.arange(0, BD)
        d_ok = d < D
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xn + d[None, :] * stride_xd,
                    mask=take[:, None] & d_ok[None, :], other=0.0)
        tl.atomic_add(sums_ptr + best_idx[:, None] * stride_sk + d[None, :], x.to(tl.float32),
                      mask=take[:, None] & d_ok[None, :], sem="relaxed")
        tl.atomic_add(counts_ptr + best_idx, tl.full([BM], 1, tl.int64), mask=take, sem="relaxed")


# ---- group statistics ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def stats_atomic_kernel(
    x_ptr, index_ptr, sums_ptr, counts_ptr, N, D,
    stride_xn, stride_xd, stride_i, stride_sk,
    BM: tl.constexpr, BD: tl.constexpr,
):
    """Grid (row blocks, feature blocks): float32 atomics into sums[index[r]], counts by block 0."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    d = pid_d * BD + tl.arange(0, BD)
    d_ok = d < D
    g = tl.load(index_ptr + rows.to(tl.int64) * stride_i, mask=row_ok, other=0)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xn + d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    tl.atomic_add(sums_ptr + g[:, None] * stride_sk + d[None, :], x.to(tl.float32),
                  mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    if pid_d == 0:
        tl.atomic_add(counts_ptr + g, tl.full([BM], 1, tl.int64), mask=row_ok, sem="relaxed")


@triton.jit
def stats_segmented_kernel(
    x_ptr, order_ptr, bounds_ptr, sums_ptr, counts_ptr, D,
    stride_xn, stride_xd, stride_sk,
    BM: tl.constexpr, BD: tl.constexpr,
):
    """Deterministic statistics: program (k, feature block) sums the rows order[bounds[k]:bounds[k+1]]
    (the members of group k, in a fixed order) without atomics."""
    k = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(bounds_ptr + k).to(tl.int32)
    stop = tl.load(bounds_ptr + k + 1).to(tl.int32)
    d = pid_d * BD + tl.arange(0, BD)
    d_ok = d < D
    acc = tl.zeros([BM, BD], tl.float32)
    for r0 in range(start, stop, BM):
        r = r0 + tl.arange(0, BM)
        r_ok = r < stop
        src = tl.load(order_ptr + r, mask=r_ok, other=0)
        acc += tl.load(x_ptr + src[:, None] * stride_xn + d[None, :] * stride_xd,
                       mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    tl.store(sums_ptr + k.to(tl.int64) * stride_sk + d, tl.sum(acc, 0), mask=d_ok)
    if pid_d == 0:
        tl.store(counts_ptr + k, (stop - start).to(tl.int64))


# ---- momentum update + renormalisation ------------------------------------------------------------


@triton.jit(do_not_specialize=["K"])
def momentum_kernel(
    c_ptr, sums_ptr, counts_ptr, out_ptr, K, D, beta,
    stride_ck, stride_cd, stride_sk, stride_sd, stride_n, stride_ok,
    BK: tl.constexpr, BD: tl.constexpr,
):
    """Rows with count > 0: normalize(beta * c + (1 - beta) * sum / count) (eps 1e-12 as F.normalize);
    other rows are copied."""
    pid = tl.program_id(0)
    rows = pid * BK + tl.arange(0, BK)
    row_ok = rows < K
    d = tl.arange(0, BD)
    mask = row_ok[:, None] & (d[None, :] < D)
    r64 = rows.to(tl.int64)
    c = tl.load(c_ptr + r64[:, None] * stride_ck + d[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sums_ptr + r64[:, None] * stride_sk + d[None, :] * stride_sd, mask=mask, other=0.0)
    n = tl.load(counts_ptr + r64 * stride_n, mask=row_ok, other=0)
    mean = s / tl.maximum(n, 1).to(tl.float32)[:, None]
    v = beta * c + (1.0 - beta) * mean
    norm = tl.sqrt(tl.sum(v * v, 1))
    moved = v / tl.maximum(norm, 1e-12)[:, None]
    res = tl.where((n > 0)[:, None], moved, c)
    tl.store(out_ptr + r64[:, None] * stride_ok + d[None, :], res.to(out_ptr.dtype.element_ty), mask=mask)


# ---- loss: flash-attention-style forward ----------------------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "T", "tiles_per_split"])
def loss_fwd_kernel(
    p_ptr, c_ptr, tgt_ptr, m_ptr, l_ptr, acc_ptr, lse_ptr, att_ptr, tl_ptr,
    N, K, D, T, tiles_per_split, inv_t, scale2,
    stride_pn, stride_pd, stride_ck, stride_cd, stride_tt, stride_tn,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, FINAL: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Program (row block, split) streams its group tiles with a running max of the raw scores
    <p, c_k>, sum of exponentials and rescaled accumulator sum_k e^{l_k} c_k; the exponentials are
    taken in log2 units (scores times scale2 = log2(e) / tau, one multiply per score).
    FINAL (one split): writes lse = max * inv_t + log(sum) [N] and attention [N, D]; otherwise the
    partial (raw max, sum, acc) [split, N(, D)] for the merge kernel. Split 0 also writes the
    target logits <p, c_y> * inv_t for the T target sets through the same tl.dot. Where the
    softmax is exactly one-hot (K = 1) the sum is exactly 1 and lse is exactly the logit, which
    the group gradient relies on (its recomputed probability is then exactly 1).
    EVEN_K: K is a multiple of BN (no column masks)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    d = tl.arange(0, BD)
    d_ok = d < D
    q = tl.load(p_ptr + r64[:, None] * stride_pn + d[None, :] * stride_pd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if pid_s == 0:
        diag = tl.arange(0, BM)[:, None] == tl.arange(0, BM)[None, :]
        for t in range(0, T):
            y = tl.load(tgt_ptr + t * stride_tt + r64 * stride_tn, mask=row_ok, other=0)
            cy = tl.load(c_ptr + y[:, None] * stride_ck + d[None, :] * stride_cd,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            sd = _dot(q, tl.trans(cy), PRECISION, UPCAST)
            tl.store(tl_ptr + t * N + rows, tl.sum(tl.where(diag, sd, 0.0), 1) * inv_t, mask=row_ok)
    raw_max = tl.full([BM], float("-inf"), tl.float32)  # max_k <p, c_k> so far
    m_i = tl.full([BM], float("-inf"), tl.float32)  # raw_max * scale2 = max of the scaled scores
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    k_begin = pid_s * tiles_per_split * BN
    k_stop = tl.minimum(k_begin + tiles_per_split * BN, K)
    for k0 in range(k_begin, k_stop, BN):
        cols = k0 + tl.arange(0, BN)
        raw, c = _tile_scores(q, c_ptr, cols, d, d_ok, K, stride_ck, stride_cd, EVEN_K, PRECISION, UPCAST)
        raw_max = tl.maximum(raw_max, tl.max(raw, 1))
        # rounding is monotonic, so raw_max * scale2 is exactly the largest of the scaled scores
        m_new = raw_max * scale2
        alpha = tl.exp2(m_i - m_new)
        e = tl.exp2(raw * scale2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(e, 1)
        acc = acc * alpha[:, None] + _dot(_operand(e, c, UPCAST), c, PRECISION, UPCAST)
        m_i = m_new
    if FINAL:
        l_i = tl.where(row_ok, l_i, 1.0)  # padding rows: keep log/divide quiet
        tl.store(lse_ptr + rows, raw_max * inv_t + tl.log(l_i), mask=row_ok)
        tl.store(att_ptr + r64[:, None] * D + d[None, :], acc / l_i[:, None],
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = pid_s.to(tl.int64) * N + r64
        tl.store(m_ptr + part, raw_max, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["N", "SPLIT"])
def loss_merge_kernel(
    m_ptr, l_ptr, acc_ptr, lse_ptr, att_ptr, N, D, SPLIT, inv_t, scale2,
    BM: tl.constexpr, BD: tl.constexpr,
):
    """Combines the splits' (raw max m_s, l_s, acc_s): M = max m_s, w_s = 2^((m_s - M) scale2)
    (the scaled maxima exactly as each split computed them), L = sum w_s l_s,
    attention = sum w_s acc_s / L, lse = M inv_t + log L."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    d = tl.arange(0, BD)
    mask = row_ok[:, None] & (d[None, :] < D)
    big = tl.full([BM], float("-inf"), tl.float32)
    for s in range(0, SPLIT):
        big = tl.maximum(big, tl.load(m_ptr + s * N + r64, mask=row_ok, other=0.0))
    total = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for s in range(0, SPLIT):
        part = s * N + r64
        w = tl.exp2(tl.load(m_ptr + part, mask=row_ok, other=0.0) * scale2 - big * scale2)
        total += w * tl.load(l_ptr + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=mask, other=0.0)
    total = tl.where(row_ok, total, 1.0)
    tl.store(lse_ptr + rows, big * inv_t + tl.log(total), mask=row_ok)
    tl.store(att_ptr + r64[:, None] * D + d[None, :], acc / total[:, None], mask=mask)


# ---- loss: group gradient ----------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "K", "rows_per_split"])
def group_grad_kernel(
    p_ptr, c_ptr, lse_ptr, w_ptr, wmax_ptr, out_ptr,
    N, K, D, rows_per_split, inv_t,
    stride_pn, stride_pd, stride_ck, stride_cd,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, NORMALIZE_W: tl.constexpr, SPLIT_PROB: tl.constexpr,
):
    """Program (group block, row split): out[split, k] = inv_t * sum_b w_b softmax_bk p_b over its
    rows, recomputing the softmax from the saved lse. NORMALIZE_W (float16): the weights are divided
    by max|w| before the 16-bit cast, and the result multiplied back, so tiny weights do not
    underflow. SPLIT_PROB (16-bit inputs): the weighted probabilities enter the second product as
    hi + lo 16-bit parts (two MMAs), so they keep ~16 more bits than one 16-bit rounding; where the
    softmax is (nearly) one-hot the gradient is a difference of nearly equal terms and needs them."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_k * BN + tl.arange(0, BN)
    col_ok = cols < K
    c64 = cols.to(tl.int64)
    d = tl.arange(0, BD)
    d_ok = d < D
    c = tl.load(c_ptr + c64[:, None] * stride_ck + d[None, :] * stride_cd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    wmax = tl.load(wmax_ptr)
    wdiv = tl.where(wmax > 0, wmax, 1.0)
    acc = tl.zeros([BN, BD], tl.float32)
    r_begin = pid_s * rows_per_split
    r_stop = tl.minimum(r_begin + rows_per_split, N)
    for r0 in range(r_begin, r_stop, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < r_stop
        r64 = rows.to(tl.int64)
        q = tl.load(p_ptr + r64[:, None] * stride_pn + d[None, :] * stride_pd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
        if NORMALIZE_W:
            w = w / wdiv
        # logits exactly as in the forward pass, so a one-hot softmax gives exactly 1
        s = _dot(q, tl.trans(c), PRECISION, UPCAST) * inv_t
        prob = tl.exp2((s - lse[:, None]) * 1.4426950408889634) * w[:, None]
        prob = tl.where(row_ok[:, None], prob, 0.0)
        hi = _operand(prob, q, UPCAST)
        acc += _dot(tl.trans(hi), q, PRECISION, UPCAST)
        if SPLIT_PROB:  # the rounding error of hi as a second 16-bit operand: ~16 more bits
            lo = _operand(prob - hi.to(tl.float32), q, UPCAST)
            acc += _dot(tl.trans(lo), q, PRECISION, UPCAST)
    out = (pid_s.to(tl.int64) * K + c64)[:, None] * D + d[None, :]
    if NORMALIZE_W:
        acc = acc * wdiv
    tl.store(out_ptr + out, acc * inv_t, mask=col_ok[:, None] & d_ok[None, :])

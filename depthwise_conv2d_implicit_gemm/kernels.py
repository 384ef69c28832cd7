"""Triton kernels for the depthwise "same" convolution with a large rectangular kernel.

Why a GEMM: along its long axis one kernel row acts on one image line as a banded Toeplitz
matrix ``T[k, a] = w[k - a + p]`` (input position ``k``, output position ``a``, ``p = K // 2``).
For one channel the convolution is therefore a short sum, over the taps of the *short* kernel
axis, of ``(image lines shifted by the tap) @ T``; every line of every image in the batch shares
the same ``T``, so the GEMM's M dimension is ``batch * lines`` and the products run on tensor
cores through ``tl.dot``. With image extents of 7..64 and kernels of 13..51 the band covers most
of a 16..64 wide tile, so little of that work is wasted; longer lines are tiled and only the
input chunks that meet the band are visited.

Maps of at most 64 pixels (SLaK's 7x7 stage) use the whole-plane variants at the end of this
file instead: one GEMM per block of images with a 2-D Toeplitz matrix, no lines at all. A
deployed unit (a tall and a wide biased kernel, summed; ``sum.py``) on maps of at most 64x64
pixels runs ``dwconv_cross_kernel``, which applies both kernels to whole images of one
channel. Where one 64-wide tile spans a line, the Toeplitz tiles are written to memory once per
call (``dwconv_toeplitz_kernel``) instead of gathered by every program.

Geometry shared by the line kernels (``plans.py`` maps NCHW onto it):

* ``A`` is the axis the long kernel side runs along (length ``LA``, kernel taps ``KA``),
  ``B`` the other spatial axis (``LB``, ``KB`` taps). ``LONG_IS_H`` says whether ``A`` is the
  image height; then the tile is stored transposed (``[a, m]``) so that the contiguous image
  width stays the fastest-moving tile axis for coalesced loads.
* ``m`` enumerates the ``N * LB`` image lines of one channel: ``n = m // LB, b = m % LB``.
* ``DOT_UPCAST`` feeds ``tl.dot`` float32 copies of its operands. Only the interpreter sets it,
  for bfloat16: its ``tl.dot`` multiplies the raw uint16 storage of bfloat16 values (Triton 3.8).
  Products of bfloat16 values are exact in float32, so the result is what tensor cores give.
* ``INDEX_64``: element offsets in 64 bits, only for tensors that need them. 32-bit offsets
  halve the registers that the tiles' address tensors take (the 8-warp forward kernel hit the
  255-register limit with 64-bit ones, leaving one block per SM).
* Weights are addressed as ``w[c, tap_b, tap_a]`` through strides, so no copy is needed to
  swap the kernel's axes.
* ``LA_ONE_BLOCK`` (the long axis's length when one tile spans it, else 0), ``ALIGN`` (a
  power of two dividing every input line's start offset, 1 when the long axis is H) and the
  output's ``Y_ALIGN``, ``Y_M_CONTIG`` and ``EVEN_M`` (see ``heuristics.store_hints``) are hints that
  the launcher derives from the tensors: with them Triton proves the alignment and the mask
  uniformity that 16-byte vector loads, stores and asynchronous copies need, which it cannot
  from runtime sizes and strides (specialising those would compile a kernel per shape).

The kernels are self-contained because they are wrapped lazily in two modes, the GPU compiler
and ``TRITON_INTERPRET=1`` (see ``get_kernels``), and Triton's interpreter cannot call
functions that ``@triton.jit`` wrapped for the compiler. That includes the jit-defined parts of
``triton.language`` whenever Triton was imported without the variable (as in a test run that
sets it per test), hence ``tl.full`` instead of ``tl.zeros`` and ``tl.reduce`` with the
standard sum combiner (which the interpreter maps to ``numpy.sum``) instead of ``tl.sum``.
That combiner is private to Triton: it is used only on the Triton 3 releases that have it
(``SUM_COMBINE``), and ``tl.sum`` otherwise (compiled kernels, and the interpreter when Triton
was imported under ``TRITON_INTERPRET=1``, are fine with it).
"""
import inspect

import triton
import triton.language as tl

SUM_COMBINE = tl.constexpr(triton.__version__.split(".")[0] == "3" and
                           hasattr(tl.standard, "_sum_combine"))


def dwconv_fwd_kernel(
    x_ptr, w_ptr, toeplitz_ptr, bias_ptr, y_ptr,
    N, LA, LB, KA, KB,
    sxn, sxc, sxa, sxb,
    syn, syc, sya, syb,
    swc, swa, swb,
    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr, LONG_IS_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
    LA_ONE_BLOCK: tl.constexpr = 0, ALIGN: tl.constexpr = 1,
    Y_ALIGN: tl.constexpr = 1, Y_M_CONTIG: tl.constexpr = 1, EVEN_M: tl.constexpr = False,
    TOEPLITZ_IN_MEMORY: tl.constexpr = False,
):
    """y[n, c, b, a] = sum_{i, j} x[n, c, b + i - KB//2, a + j - KA//2] * w[c, i, j] (+ bias[c]).

    With ``FLIP`` the kernel is used rotated by 180 degrees, which turns this forward pass into
    the input gradient (``x`` is then the output gradient). With ``TOEPLITZ_IN_MEMORY`` (lines
    that one tile spans) the band of tap ``i`` is read as a dense tile that
    ``dwconv_toeplitz_kernel`` wrote for this launch (``toeplitz_ptr``), instead of gathered
    from the weights by every program. Grid: ``(cdiv(N * LB, BLOCK_M), cdiv(LA, BLOCK_A), C)``.
    """
    pid_m = tl.program_id(0)
    pid_a = tl.program_id(1)
    c = tl.program_id(2)
    PA = KA // 2
    PB = KB // 2

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < N * LB
    n = m // LB
    b = m % LB
    if INDEX_64:
        c = c.to(tl.int64)
        n = n.to(tl.int64)
    a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a0 = pid_a * BLOCK_A
    # Input positions that meet the band of this output block, clipped to the image: the
    # zero padding is never read, masked loads supply it.
    if LA_ONE_BLOCK:   # a compile-time extent lets masks keep 16-byte vectors whole
        la = LA_ONE_BLOCK
        k_lo = 0
        k_hi = LA_ONE_BLOCK
    else:
        la = LA
        k_lo = tl.maximum(a0 - PA, 0)
        k_hi = tl.minimum(a0 + BLOCK_A + PA, LA)

    x_base = x_ptr + c * sxc
    if ALIGN > 1:
        x_base = tl.multiple_of(x_base, ALIGN * (x_ptr.dtype.element_ty.primitive_bitwidth // 8))
    w_base = w_ptr + c * swc
    if LONG_IS_H:
        acc = tl.full((BLOCK_A, BLOCK_M), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_A), 0.0, tl.float32)

    # One flat loop over (tap of the short axis, chunk of the band) so that the compiler's
    # software pipelining overlaps the loads of the next step with the current dot; with
    # images up to 64 wide there is one chunk per tap and a nested loop would have a single
    # trip.
    n_chunks = (k_hi - k_lo + BLOCK_K - 1) // BLOCK_K
    for step in range(0, KB * n_chunks):
        i = step // n_chunks
        k0 = k_lo + (step - i * n_chunks) * BLOCK_K
        b_in = b + i - PB
        line_ok = m_ok & (b_in >= 0) & (b_in < LB)
        line_off = n * sxn + b_in * sxb
        if ALIGN > 1:
            line_off = tl.multiple_of(line_off, ALIGN)
        if FLIP:
            tap_b = KB - 1 - i
        else:
            tap_b = i
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_hi
        if LONG_IS_H:
            # Toeplitz as the left operand: acc[a, m] += T[a, k] @ x[k, m].
            xt = tl.load(x_base + k[:, None] * sxa + line_off[None, :],
                         mask=k_ok[:, None] & line_ok[None, :], other=0.0)
            d = k[None, :] - a[:, None] + PA
        else:
            # acc[m, a] += x[m, k] @ T[k, a].
            xt = tl.load(x_base + line_off[:, None] + k[None, :] * sxa,
                         mask=line_ok[:, None] & k_ok[None, :], other=0.0)
            d = k[:, None] - a[None, :] + PA
        if FLIP:
            tap_a = KA - 1 - d
        else:
            tap_a = d
        if TOEPLITZ_IN_MEMORY:
            # One tile spans the line, so k0 = a0 = 0 and step = i: tile i of this channel.
            t_tile = toeplitz_ptr + (c * KB + i) * (BLOCK_K * BLOCK_A)
            if LONG_IS_H:
                t = tl.load(t_tile + a[:, None] * BLOCK_K + k[None, :])
            else:
                t = tl.load(t_tile + k[:, None] * BLOCK_A + a[None, :])
        else:
            # The band: a gather from the channel's few hundred weights, which stay in L1.
            t = tl.load(w_base + tap_b * swb + tap_a * swa, mask=(d >= 0) & (d < KA), other=0.0)
        t = t.to(xt.dtype)
        if DOT_UPCAST:
            xt = xt.to(tl.float32)
            t = t.to(tl.float32)
        if LONG_IS_H:
            acc = tl.dot(t, xt, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(xt, t, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c).to(tl.float32)
    y_base = y_ptr + c * syc
    out_off = n * syn + b * syb
    a_off = a * sya
    if Y_M_CONTIG > 1:
        # Consecutive lines are adjacent elements (a transposed problem writing into the
        # caller's layout): runs of Y_M_CONTIG lines form aligned vectors.
        y_base = tl.multiple_of(
            y_base, Y_M_CONTIG * (y_ptr.dtype.element_ty.primitive_bitwidth // 8))
        out_off = tl.max_contiguous(tl.multiple_of(out_off, Y_M_CONTIG), Y_M_CONTIG)
        a_off = tl.multiple_of(a_off, Y_M_CONTIG)
    elif Y_ALIGN > 1:
        y_base = tl.multiple_of(y_base, Y_ALIGN * (y_ptr.dtype.element_ty.primitive_bitwidth // 8))
        out_off = tl.multiple_of(out_off, Y_ALIGN)
    a_ok = a < la
    # Without a partial line block (EVEN_M) the mask leaves out the lines, along which Triton
    # could not prove it uniform across a vector.
    if LONG_IS_H:
        if EVEN_M:
            mask = a_ok[:, None]
        else:
            mask = a_ok[:, None] & m_ok[None, :]
        tl.store(y_base + a_off[:, None] + out_off[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        if EVEN_M:
            mask = a_ok[None, :]
        else:
            mask = m_ok[:, None] & a_ok[None, :]
        tl.store(y_base + out_off[:, None] + a_off[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=mask)


def dwconv_toeplitz_kernel(
    w_ptr, t_ptr, KA, KB, swc, swa, swb,
    FLIP: tl.constexpr, LONG_IS_H: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The Toeplitz tiles that ``dwconv_fwd_kernel`` reads with ``TOEPLITZ_IN_MEMORY``: for
    channel ``c`` and loop step ``i`` (tap ``i`` of the short axis, ``KB - 1 - i`` with
    ``FLIP``), ``t[c, i, k, a] = w[c, tap_b, tap_a(k - a + KA//2)]`` over the whole tile (zero
    off the band), stored ``[a, k]`` when ``LONG_IS_H`` (the orientation of the dot's left
    operand there) and ``[k, a]`` otherwise, in ``t_ptr``'s dtype. Grid: ``(C * KB,)``.
    """
    pid = tl.program_id(0)
    c = pid // KB
    i = pid % KB
    if FLIP:
        tap_b = KB - 1 - i
    else:
        tap_b = i
    k = tl.arange(0, BLOCK_K)
    a = tl.arange(0, BLOCK_A)
    if LONG_IS_H:
        d = k[None, :] - a[:, None] + KA // 2
        offs = a[:, None] * BLOCK_K + k[None, :]
    else:
        d = k[:, None] - a[None, :] + KA // 2
        offs = k[:, None] * BLOCK_A + a[None, :]
    if FLIP:
        tap_a = KA - 1 - d
    else:
        tap_a = d
    t = tl.load(w_ptr + c * swc + tap_b * swb + tap_a * swa, mask=(d >= 0) & (d < KA), other=0.0)
    tl.store(t_ptr + pid.to(tl.int64) * (BLOCK_K * BLOCK_A) + offs,
             t.to(t_ptr.dtype.element_ty))


def dwconv_cross_kernel(
    x_ptr, wide_ptr, tall_ptr, bias_ptr, y_ptr,
    N, KBW, KBT, sxn, sxc, syn, syc,
    H: tl.constexpr, W: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, G: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INDEX_64: tl.constexpr, ALIGN: tl.constexpr = 1, Y_ALIGN: tl.constexpr = 1,
):
    """A deployed unit, ``y = conv(x, w_tall) + conv(x, w_wide) + bias``, on maps of at most
    64x64 pixels (``HP``/``WP``: ``H``/``W`` rounded up to a power of two), from one read of
    each image: every program takes ``G`` whole images of one channel.

    * The wide kernel as in ``dwconv_fwd_kernel``: rows ``(g, h)`` of the images, shifted by
      each of its ``KBW`` rows, times that row's Toeplitz tile ``wide[c, i]`` (``[k, a]``
      along W), accumulated as ``acc[(g, h), w]``.
    * The tall kernel on the same images read column-wise (the tile ``[(g, w), h']``, shifted
      along W by each of its ``KBT`` columns; the shifted re-reads hit the cache), times that
      column's Toeplitz tile ``tall[c, j]`` (``[k, a]`` along H), accumulated as
      ``acc_t[(g, w), h]`` and transposed image by image onto ``acc``.

    Both tile sets are written by ``dwconv_toeplitz_kernel`` for the call. ``H`` and ``W``
    are compile-time constants, so that masks along the lines stay uniform across vectors.
    Grid: ``(cdiv(N, G), C)``.
    """
    pid = tl.program_id(0)
    c = tl.program_id(1)
    if INDEX_64:
        c = c.to(tl.int64)
    x_base = x_ptr + c * sxc
    y_base = y_ptr + c * syc
    if ALIGN > 1:
        x_base = tl.multiple_of(x_base, ALIGN * (x_ptr.dtype.element_ty.primitive_bitwidth // 8))
    if Y_ALIGN > 1:
        y_base = tl.multiple_of(y_base, Y_ALIGN * (y_ptr.dtype.element_ty.primitive_bitwidth // 8))

    # Wide kernel: rows r = (g, h), columns w.
    r = tl.arange(0, G * HP)
    n = pid * G + r // HP
    h = r % HP
    if INDEX_64:
        n = n.to(tl.int64)
    row_ok = (h < H) & (n < N)
    wk = tl.arange(0, WP)
    col_ok = wk < W
    acc = tl.full((G * HP, WP), 0.0, tl.float32)
    for i in range(0, KBW):
        h_in = h + i - KBW // 2
        ok = row_ok & (h_in >= 0) & (h_in < H)
        row_off = n * sxn + h_in * W
        if ALIGN > 1:
            row_off = tl.multiple_of(row_off, ALIGN)
        xt = tl.load(x_base + row_off[:, None] + wk[None, :], mask=ok[:, None] & col_ok[None, :],
                     other=0.0)
        t = tl.load(wide_ptr + (c * KBW + i) * (WP * WP) + wk[:, None] * WP + wk[None, :])
        if DOT_UPCAST:
            xt = xt.to(tl.float32)
            t = t.to(tl.float32)
        acc = tl.dot(xt, t, acc, input_precision=DOT_PRECISION)

    # Tall kernel: rows q = (g, w), columns h.
    q = tl.arange(0, G * WP)
    n_t = pid * G + q // WP
    w = q % WP
    if INDEX_64:
        n_t = n_t.to(tl.int64)
    hk = tl.arange(0, HP)
    acc_t = tl.full((G * WP, HP), 0.0, tl.float32)
    for j in range(0, KBT):
        w_in = w + j - KBT // 2
        ok = (w < W) & (n_t < N) & (w_in >= 0) & (w_in < W)
        xt = tl.load(x_base + (n_t * sxn + w_in)[:, None] + hk[None, :] * W,
                     mask=ok[:, None] & (hk < H)[None, :], other=0.0)
        t = tl.load(tall_ptr + (c * KBT + j) * (HP * HP) + hk[:, None] * HP + hk[None, :])
        if DOT_UPCAST:
            xt = xt.to(tl.float32)
            t = t.to(tl.float32)
        acc_t = tl.dot(xt, t, acc_t, input_precision=DOT_PRECISION)
    acc += tl.reshape(tl.permute(tl.reshape(acc_t, (G, WP, HP)), (0, 2, 1)), (G * HP, WP))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c).to(tl.float32)
    out_off = n * syn + h * W
    if Y_ALIGN > 1:
        out_off = tl.multiple_of(out_off, Y_ALIGN)
    tl.store(y_base + out_off[:, None] + wk[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def dwconv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, scratch_ptr,
    N, LA, LB, KA, KB, N_KCHUNK, SPLIT_M,
    sxn, sxc, sxa, sxb,
    sdn, sdc, sda, sdb,
    swslot, swc, swi, swj,
    LONG_IS_H: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
    KA_PAD: tl.constexpr, LA_ONE_BLOCK: tl.constexpr = 0, ALIGN: tl.constexpr = 1,
):
    """Weight gradient, or partial ones: ``dw[slot, c, i, j]`` summed over ``slot`` is
    dL/dw[c, i, j] (tap ``i`` of the short axis, ``j`` of the long one; any strides).

    For kernel row ``i`` the program forms ``G[k, a] = sum_m x[m + i - KB//2, k] * dy[m, a]``
    over its share of the lines ``m`` (a GEMM whose reduction runs over the lines), then sums
    ``G`` along its diagonals: tap ``j = k - a + KA//2``. ``slot`` enumerates (output block,
    band chunk, line split); every program writes all ``KA`` taps of its own slot (zeros where
    its chunk holds none), so no element is written twice, nothing needs zero-filling, and the
    final sum over slots is deterministic. Grid: ``(C * KB, cdiv(LA, BLOCK_A) * N_KCHUNK,
    SPLIT_M)``.
    """
    pid_ci = tl.program_id(0)
    pid_ak = tl.program_id(1)
    pid_s = tl.program_id(2)
    c = pid_ci // KB
    if INDEX_64:
        c = c.to(tl.int64)
    i = pid_ci % KB
    a_blk = pid_ak // N_KCHUNK
    k_chunk = pid_ak % N_KCHUNK
    PA = KA // 2
    PB = KB // 2

    # As in the forward pass only input positions inside both the band and the image are
    # visited: for images up to 64 wide that is one chunk, whatever the kernel length.
    a0 = a_blk * BLOCK_A
    if LA_ONE_BLOCK:
        la = LA_ONE_BLOCK
        k_lo = 0
        k_hi = LA_ONE_BLOCK
    else:
        la = LA
        k_lo = tl.maximum(a0 - PA, 0)
        k_hi = tl.minimum(a0 + BLOCK_A + PA, LA)
    k0 = k_lo + k_chunk * BLOCK_K
    a = a0 + tl.arange(0, BLOCK_A)
    k = k0 + tl.arange(0, BLOCK_K)
    a_ok = a < la
    k_ok = k < k_hi

    n_lines = N * LB
    # A chunk past the band gets an empty line range (its slot receives zeros), which keeps
    # the control flow uniform.
    m_start = tl.where(k0 < k_hi, pid_s * BLOCK_M, n_lines)

    x_base = x_ptr + c * sxc
    dy_base = dy_ptr + c * sdc
    if ALIGN > 1:
        x_base = tl.multiple_of(x_base, ALIGN * (x_ptr.dtype.element_ty.primitive_bitwidth // 8))
        dy_base = tl.multiple_of(dy_base, ALIGN * (dy_ptr.dtype.element_ty.primitive_bitwidth // 8))
    g = tl.full((BLOCK_K, BLOCK_A), 0.0, tl.float32)
    for m0 in range(m_start, n_lines, SPLIT_M * BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < n_lines
        n = m // LB
        if INDEX_64:
            n = n.to(tl.int64)
        b = m % LB
        b_in = b + i - PB
        line_ok = m_ok & (b_in >= 0) & (b_in < LB)
        x_off = n * sxn + b_in * sxb
        dy_off = n * sdn + b * sdb
        if ALIGN > 1:
            x_off = tl.multiple_of(x_off, ALIGN)
            dy_off = tl.multiple_of(dy_off, ALIGN)
        if LONG_IS_H:
            xt = tl.load(x_base + k[:, None] * sxa + x_off[None, :],
                         mask=k_ok[:, None] & line_ok[None, :], other=0.0)
            dyt = tl.load(dy_base + a[:, None] * sda + dy_off[None, :],
                          mask=a_ok[:, None] & m_ok[None, :], other=0.0)
            if DOT_UPCAST:
                xt = xt.to(tl.float32)
                dyt = dyt.to(tl.float32)
            g = tl.dot(xt, tl.trans(dyt), g, input_precision=DOT_PRECISION)
        else:
            xt = tl.load(x_base + x_off[:, None] + k[None, :] * sxa,
                         mask=line_ok[:, None] & k_ok[None, :], other=0.0)
            dyt = tl.load(dy_base + dy_off[:, None] + a[None, :] * sda,
                          mask=m_ok[:, None] & a_ok[None, :], other=0.0)
            if DOT_UPCAST:
                xt = xt.to(tl.float32)
                dyt = dyt.to(tl.float32)
            g = tl.dot(tl.trans(xt), dyt, g, input_precision=DOT_PRECISION)

    # Diagonal sums of G through a per-program scratch tile: written once, then read back
    # skewed so that row j holds the diagonal of tap j, which costs one tile of L1/L2 traffic
    # instead of KA masked reductions over the whole tile.
    pid_lin = (pid_ci.to(tl.int64) * tl.num_programs(1) + pid_ak) * SPLIT_M + pid_s
    scratch = scratch_ptr + pid_lin * (BLOCK_K * BLOCK_A)
    rk = tl.arange(0, BLOCK_K)
    ra = tl.arange(0, BLOCK_A)
    tl.store(scratch + rk[:, None] * BLOCK_A + ra[None, :], g)
    tl.debug_barrier()
    j = tl.arange(0, KA_PAD)
    kk = j[:, None] - PA - (k0 - a0) + ra[None, :]      # G row holding tap j in column ra
    diag = tl.load(scratch + kk * BLOCK_A + ra[None, :], mask=(kk >= 0) & (kk < BLOCK_K),
                   other=0.0, cache_modifier=".cg")
    if SUM_COMBINE:
        dsum = tl.reduce(diag, 1, tl.standard._sum_combine)
    else:
        dsum = tl.sum(diag, 1)
    slot = pid_ak * SPLIT_M + pid_s
    tl.store(dw_ptr + slot * swslot + c * swc + i * swi + j * swj,
             dsum.to(dw_ptr.dtype.element_ty), mask=j < KA)


def dwconv_plane_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    N, H, W, KH, KW,
    sxn, sxc, syn, syc, swc, swh, sww,
    HAS_BIAS: tl.constexpr, FLIP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, PLANE: tl.constexpr,
):
    """Whole-plane variant for maps of at most ``PLANE`` pixels (SLaK's 7x7 stage 4).

    ``y[n, c, p] = sum_q x[n, c, q] * T[q, p]`` over flattened planes (``p, q < H * W``, each
    plane contiguous), with the 2-D Toeplitz matrix ``T[q, p] = w[c, hq - hp + KH//2,
    wq - wp + KW//2]`` (zero outside the kernel): one GEMM per block of images, M = images,
    K = N = pixels. On such maps the line kernel pads every 7-pixel line to a 16-wide tile and
    reads each image once per kernel row; this reads it once, in one dense tile. ``FLIP``
    rotates the kernel (input gradient). Grid: ``(cdiv(N, BLOCK_M), C)``.
    """
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = n < N
    if INDEX_64:
        c = c.to(tl.int64)
        n = n.to(tl.int64)
    hw = H * W
    q = tl.arange(0, PLANE)   # input pixel (rows of T)
    p = tl.arange(0, PLANE)   # output pixel (columns of T)
    q_ok = q < hw
    p_ok = p < hw
    xt = tl.load(x_ptr + c * sxc + n[:, None] * sxn + q[None, :],
                 mask=n_ok[:, None] & q_ok[None, :], other=0.0)
    di = (q // W)[:, None] - (p // W)[None, :] + KH // 2
    dj = (q % W)[:, None] - (p % W)[None, :] + KW // 2
    in_kernel = (di >= 0) & (di < KH) & (dj >= 0) & (dj < KW) & q_ok[:, None] & p_ok[None, :]
    if FLIP:
        di = KH - 1 - di
        dj = KW - 1 - dj
    t = tl.load(w_ptr + c * swc + di * swh + dj * sww, mask=in_kernel, other=0.0).to(xt.dtype)
    if DOT_UPCAST:
        xt = xt.to(tl.float32)
        t = t.to(tl.float32)
    acc = tl.dot(xt, t, tl.full((BLOCK_M, PLANE), 0.0, tl.float32), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c).to(tl.float32)
    tl.store(y_ptr + c * syc + n[:, None] * syn + p[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & p_ok[None, :])


def dwconv_plane_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, scratch_ptr,
    N, H, W, KH, KW,
    sxn, sxc, sdn, sdc, swc, swh, sww,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, PLANE: tl.constexpr, TAPS_PAD: tl.constexpr,
):
    """Weight gradient of ``dwconv_plane_fwd_kernel``: ``G = x^T dy`` over all images of the
    channel (``G[q, p]``, one GEMM whose reduction runs over the images), then tap ``(i, j)``
    sums ``G[p + (i - KH//2, j - KW//2), p]`` over the output pixels ``p`` whose shifted pixel
    lies in the image. The sums gather from a per-channel scratch copy of ``G`` (as the line
    kernel's diagonal sums do). Grid: ``(C,)``.
    """
    c = tl.program_id(0)
    if INDEX_64:
        c = c.to(tl.int64)
    hw = H * W
    pix = tl.arange(0, PLANE)
    pix_ok = pix < hw
    g = tl.full((PLANE, PLANE), 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_M):
        n = n0 + tl.arange(0, BLOCK_M)
        ok = (n < N)[:, None] & pix_ok[None, :]
        if INDEX_64:
            n = n.to(tl.int64)
        xt = tl.load(x_ptr + c * sxc + n[:, None] * sxn + pix[None, :], mask=ok, other=0.0)
        dyt = tl.load(dy_ptr + c * sdc + n[:, None] * sdn + pix[None, :], mask=ok, other=0.0)
        if DOT_UPCAST:
            xt = xt.to(tl.float32)
            dyt = dyt.to(tl.float32)
        g = tl.dot(tl.trans(xt), dyt, g, input_precision=DOT_PRECISION)

    scratch = scratch_ptr + c * (PLANE * PLANE)
    tl.store(scratch + pix[:, None] * PLANE + pix[None, :], g)
    tl.debug_barrier()
    tap = tl.arange(0, TAPS_PAD)
    i = tap // KW
    j = tap % KW
    hq = (pix // W)[None, :] + i[:, None] - KH // 2
    wq = (pix % W)[None, :] + j[:, None] - KW // 2
    ok = (tap < KH * KW)[:, None] & pix_ok[None, :] & (hq >= 0) & (hq < H) & (wq >= 0) & (wq < W)
    vals = tl.load(scratch + (hq * W + wq) * PLANE + pix[None, :], mask=ok, other=0.0,
                   cache_modifier=".cg")
    if SUM_COMBINE:
        dsum = tl.reduce(vals, 1, tl.standard._sum_combine)
    else:
        dsum = tl.sum(vals, 1)
    tl.store(dw_ptr + c * swc + i * swh + j * sww, dsum.to(dw_ptr.dtype.element_ty),
             mask=tap < KH * KW)


# Lazily compiled variants, keyed by "interpret" (see ops.py).
_COMPILED = {}


def get_kernels(interpret):
    """The kernels, compiled for the GPU or wrapped for ``TRITON_INTERPRET=1``, by the
    name of their Python function (``{"dwconv_fwd_kernel": ..., ...}``).

    ``triton.jit`` decides between compiler and interpreter from the environment when it wraps
    a function, so wrapping is deferred to the first launch in each mode: importing this
    package (as ``SLaK.py`` does) must not freeze the choice before a test sets the variable.
    """
    if interpret not in _COMPILED:
        # Sizes and strides are not specialised on divisibility: the line offsets are
        # unaligned anyway (shifted by taps), and one binary per tile configuration keeps
        # compilation to a few dozen kernels for all SLaK shapes. Unit strides still are.
        lines = ["N", "LA", "LB", "KA", "KB", "N_KCHUNK", "SPLIT_M"] + [
            p + s for p in ("sx", "sy", "sd") for s in "ncb"] + [
            "swc", "swa", "swb", "swslot", "swi", "swj"]
        # The plane kernels address whole planes, so nothing is specialised but unit strides.
        planes = ["N", "H", "W", "KH", "KW", "sxn", "sxc", "syn", "syc", "sdn", "sdc", "swc",
                  "swh"]
        # The deployed unit's kernel is specialised on the map size (H, W), not on the rest.
        cross = ["N", "KBW", "KBT", "sxn", "sxc", "syn", "syc"]
        _COMPILED[interpret] = {
            fn.__name__: triton.jit(fn, do_not_specialize=[
                a for a in unspecialised if a in inspect.signature(fn).parameters])
            for fn, unspecialised in ((dwconv_fwd_kernel, lines),
                                      (dwconv_toeplitz_kernel, lines),
                                      (dwconv_cross_kernel, cross),
                                      (dwconv_wgrad_kernel, lines),
                                      (dwconv_plane_fwd_kernel, planes),
                                      (dwconv_plane_wgrad_kernel, planes))}
    return _COMPILED[interpret]

"""Per-row 1-D clustering into a lookup table: weighted k-means (SqueezeLLM), plain k-means, and
round-to-nearest on a uniform grid (RTN), all batched across rows.

Every function takes rows ``x`` [R, n] and non-negative sample weights ``w`` [R, n] (0 = the value
does not influence the table, e.g. a value moved to the sparse part) and returns a sorted table per
row, ``lut`` float64 [R, 2^bits]. Codes are then the nearest table entry (`assign_nearest`).

Weighted k-means is solved exactly by default (`optimal_kmeans`: dynamic programming over the sorted
row, the global optimum, so no seed is involved and no local optimum is possible). Lloyd's algorithm
(`solver="lloyd"`, for ablations) runs to convergence from several starting tables -- the weighted
quantiles, a uniform grid over the weighted range, and weighted k-means++ draws from a seeded
generator -- and keeps, per row, the result with the lowest weighted SSE. With Fisher weights
(a few entries dominate a row) Lloyd's local optima are often 5-20 % worse than the optimum.
"""

from __future__ import annotations

import os

import torch

DEFAULT_RESTARTS = 2  # weighted k-means++ draws, on top of the quantile and uniform starts
MAX_ITER = 300


def row_generator(seed: int, name: str = "", device="cpu") -> torch.Generator:
    """A generator that depends on the seed and the layer name only (so resumed runs match)."""
    import zlib

    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def _fix_weights(w: torch.Tensor) -> torch.Tensor:
    """Rows whose weights are all zero fall back to uniform weights; each row is scaled to max 1."""
    w = w.clamp_min(0)
    top = w.amax(dim=1, keepdim=True)
    dead = top <= 0
    if dead.any():
        w = torch.where(dead, torch.ones_like(w), w)
        top = torch.where(dead, torch.ones_like(top), top)
    return w / top


def assign_nearest(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's table (ties go to the lower entry). `lut` may be unsorted."""
    order = torch.argsort(lut, dim=1)
    s = torch.gather(lut, 1, order).to(x.dtype)
    mid = (s[:, 1:] + s[:, :-1]) * 0.5
    # searchsorted(right=False): x == mid goes to the lower entry.
    pos = torch.searchsorted(mid.contiguous(), x.contiguous())
    return torch.gather(order, 1, pos)


def weighted_sse(x: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Per-row sum of w * (x - lut[code])^2 in float64."""
    q = torch.gather(lut.double(), 1, codes)
    return (w.double() * (x.double() - q) ** 2).sum(dim=1)


def _lloyd(xs, Wc, Sc, c, max_iter, x=None, w=None):
    """Lloyd iterations from sorted tables c until no assignment changes, on sorted rows.

    In 1-D a table's clusters are runs of the sorted values split at the midpoints between entries,
    so one iteration costs O(k log n) per row: the split points by binary search and the cluster
    sums from prefix sums `Wc`, `Sc` [R, n+1] of the sorted weights and weighted values `xs` [R, n].
    Clusters that empty are moved to the value with the largest weighted error (which never
    increases the SSE); that step needs the unsorted rows `x`, `w`.
    """
    R, n = xs.shape
    k = c.shape[1]
    c = c.clone()
    bounds = None
    tiny = torch.finfo(Wc.dtype).tiny
    for _ in range(max_iter):
        mid = (c[:, 1:] + c[:, :-1]) * 0.5
        # values <= mid go to the lower entry (as assign_nearest does)
        cut = torch.searchsorted(xs, mid.to(xs.dtype).contiguous(), right=True)
        new = torch.cat([torch.zeros(R, 1, dtype=cut.dtype, device=xs.device), cut,
                         torch.full((R, 1), n, dtype=cut.dtype, device=xs.device)], 1)
        if bounds is not None and torch.equal(new, bounds):
            break
        bounds = new
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        sw = torch.gather(Wc, 1, hi) - torch.gather(Wc, 1, lo)
        sx = torch.gather(Sc, 1, hi) - torch.gather(Sc, 1, lo)
        means = torch.where(sw > 0, sx / sw.clamp_min(tiny), c.to(sw.dtype))
        empty = sw <= 0
        if empty.any() and x is not None:
            rows = torch.nonzero(empty.any(dim=1)).squeeze(1)
            xr, wr, mr = x[rows].to(means.dtype), w[rows].to(means.dtype), means[rows]
            err = wr * (xr - torch.gather(mr, 1, assign_nearest(xr, mr))) ** 2
            for j in range(k):
                sel = torch.nonzero(empty[rows, j]).squeeze(1)
                if sel.numel() == 0:
                    continue
                e = err[sel]
                best = e.argmax(dim=1)
                ok = torch.gather(e, 1, best[:, None]).squeeze(1) > 0
                sel, best = sel[ok], best[ok]
                mr[sel, j] = xr[sel, best]
                err[sel, best] = 0
            means[rows] = mr
        c = torch.sort(means, dim=1).values.to(c.dtype)
    return c


def _quantile_init(x, w, k):
    xs, order = torch.sort(x, dim=1)
    cw = torch.cumsum(torch.gather(w, 1, order), dim=1)
    targets = cw[:, -1:] * (torch.arange(k, device=x.device, dtype=x.dtype) + 0.5) / k
    idx = torch.searchsorted(cw.contiguous(), targets.contiguous()).clamp_max(x.shape[1] - 1)
    return torch.gather(xs, 1, idx)


def _range(x, w):
    big = torch.finfo(x.dtype).max
    lo = torch.where(w > 0, x, torch.full_like(x, big)).amin(dim=1)
    hi = torch.where(w > 0, x, torch.full_like(x, -big)).amax(dim=1)
    return lo, hi


def _uniform_init(x, w, k):
    lo, hi = _range(x, w)
    t = torch.linspace(0, 1, k, device=x.device, dtype=x.dtype)
    return lo[:, None] + (hi - lo)[:, None] * t


def _kmeanspp_init(x, w, k, generator):
    """Weighted k-means++: the first centre drawn with probability ~ w, the next ones ~ w * D^2."""
    R, n = x.shape
    rows = torch.arange(R, device=x.device)
    first = torch.multinomial(w, 1, generator=generator).squeeze(1)
    centres = [x[rows, first]]
    d2 = (x - centres[0][:, None]) ** 2
    for _ in range(1, k):
        p = w * d2
        none = p.sum(dim=1, keepdim=True) <= 0
        p = torch.where(none, w, p)
        pick = torch.multinomial(p, 1, generator=generator).squeeze(1)
        centres.append(x[rows, pick])
        d2 = torch.minimum(d2, (x - centres[-1][:, None]) ** 2)
    return torch.sort(torch.stack(centres, dim=1), dim=1).values


SOLVERS = ("exact", "lloyd")


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor | None, bits: int, generator: torch.Generator | None = None,
                    solver: str = "exact", restarts: int = DEFAULT_RESTARTS, max_iter: int = MAX_ITER) -> torch.Tensor:
    """Tables float64 [R, 2^bits] minimising sum w * (x - lut[nearest])^2 per row (w=None: plain k-means).

    solver "exact": the global optimum (`optimal_kmeans`); "lloyd": Lloyd's algorithm to convergence
    from the quantile and uniform starts plus `restarts` seeded k-means++ draws, best per row.
    """
    if solver == "exact":
        return optimal_kmeans(x, w, bits)
    if solver != "lloyd":
        raise ValueError(f"solver must be one of {SOLVERS} (got {solver!r})")
    x = x.double()
    k = 1 << bits
    w = torch.ones_like(x) if w is None else _fix_weights(w.double())
    if generator is None:
        generator = row_generator(0, device=x.device)
    xs, order = torch.sort(x, dim=1)
    ws = torch.gather(w, 1, order)
    zero = torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    Wc, Sc = torch.cat([zero, ws.cumsum(1)], 1), torch.cat([zero, (ws * xs).cumsum(1)], 1)
    starts = [_quantile_init(x, w, k), _uniform_init(x, w, k)]
    starts += [_kmeanspp_init(x, w, k, generator) for _ in range(restarts)]
    best_lut, best_sse = None, None
    for c0 in starts:
        lut = _lloyd(xs, Wc, Sc, torch.sort(c0, dim=1).values, max_iter, x, w)
        sse = weighted_sse(x, w, lut, assign_nearest(x, lut))
        if best_lut is None:
            best_lut, best_sse = lut, sse
        else:
            better = sse < best_sse
            best_lut = torch.where(better[:, None], lut, best_lut)
            best_sse = torch.where(better, sse, best_sse)
    return best_lut


def rtn_table(x: torch.Tensor, w: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round-to-nearest per row: 2^bits evenly spaced values from the row's min to its max (over the
    values with w > 0; all values when w is None), as a float64 table."""
    x = x.double()
    w = torch.ones_like(x) if w is None else (w > 0).to(x.dtype)
    dead = w.sum(dim=1, keepdim=True) <= 0
    w = torch.where(dead, torch.ones_like(w), w)
    lo, hi = _range(x, w)
    t = torch.linspace(0, 1, 1 << bits, device=x.device, dtype=torch.float64)
    return lo[:, None] + (hi - lo)[:, None] * t


# ---- exact 1-D solver -------------------------------------------------------------------------------

def optimal_kmeans(x: torch.Tensor, w: torch.Tensor | None, bits: int, native: bool | None = None) -> torch.Tensor:
    """The globally optimal table of weighted 1-D k-means for every row (float64 [R, 2^bits], sorted).

    In one dimension the optimal clusters are runs of the sorted values, so dynamic programming over
    the sorted row finds the exact optimum: D_m(i) = min_j D_{m-1}(j) + cost(j, i), where cost(j, i)
    is the weighted SSE of sorted values j..i-1 around their weighted mean (prefix sums, float64).
    The best split j is monotone in i, so each of the 2^bits - 1 layers is solved by divide and
    conquer in O(n log n) instead of O(n^2) (as Ckmeans.1d.dp does). For rows on the CPU the recursion
    runs in C (`kmeans1d_native`, when a C compiler is available); otherwise (GPU rows, no compiler,
    or `native=False`) it is vectorised across rows in torch on the rows' device: at each recursion
    level every row evaluates all candidate splits of all its open segments at once.
    """
    x = x.double()
    k = 1 << bits
    w = torch.ones_like(x) if w is None else _fix_weights(w.double())
    R, n = x.shape
    xs, order = torch.sort(x, dim=1)
    ws = torch.gather(w, 1, order)
    zero = torch.zeros(R, 1, dtype=torch.float64, device=x.device)
    Wc = torch.cat([zero, ws.cumsum(1)], 1)
    Sc = torch.cat([zero, (ws * xs).cumsum(1)], 1)
    if native is None:  # C on the CPU; torch on a GPU unless SQLLM_ONNX_NATIVE_KMEANS=1
        native = x.device.type == "cpu" or os.environ.get("SQLLM_ONNX_NATIVE_KMEANS") == "1"
    if native:
        from sqllm_onnx.quantize import kmeans1d_native

        native = kmeans1d_native.available()
    if native:  # runs on the CPU whatever the rows' device
        bounds = kmeans1d_native.optimal_bounds(xs.cpu().numpy(), ws.cpu().numpy(), k)
        bounds = torch.from_numpy(bounds).to(x.device)
    else:
        Qc = torch.cat([zero, (ws * xs * xs).cumsum(1)], 1)
        bounds = _optimal_bounds_torch(Wc, Sc, Qc, k)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    sw = torch.gather(Wc, 1, hi) - torch.gather(Wc, 1, lo)
    sx = torch.gather(Sc, 1, hi) - torch.gather(Sc, 1, lo)
    # clusters without weight (fewer weighted distinct values than entries): the middle of their run
    middle = torch.gather(xs, 1, ((lo + hi - 1) // 2).clamp(0, n - 1))
    lut = torch.where(sw > 0, sx / sw.clamp_min(torch.finfo(torch.float64).tiny), middle)
    return torch.sort(lut, dim=1).values


def _optimal_bounds_torch(Wc: torch.Tensor, Sc: torch.Tensor, Qc: torch.Tensor, k: int) -> torch.Tensor:
    """Boundaries [R, k+1] of the optimal k-partition from prefix sums [R, n+1] (torch, any device)."""
    R, n1 = Wc.shape
    n = n1 - 1
    dev = Wc.device
    Wf, Sf, Qf = Wc.reshape(-1), Sc.reshape(-1), Qc.reshape(-1)
    tiny = torch.finfo(torch.float64).tiny

    def cost(a, b):  # flat prefix indices of the segment ends
        dw, ds, dq = Wf[b] - Wf[a], Sf[b] - Sf[a], Qf[b] - Qf[a]
        return (dq - torch.where(dw > 0, ds * ds / dw.clamp_min(tiny), torch.zeros_like(ds))).clamp_min(0)

    base_all = torch.arange(R, device=dev)[:, None] * n1
    D = cost(base_all.expand(R, n1).reshape(-1), (base_all + torch.arange(n1, device=dev)).reshape(-1)).view(R, n1)
    backs = []
    for m in range(2, k + 1):
        if m > n:  # more entries than values: the extra clusters stay empty
            backs.append(torch.arange(n1, device=dev).expand(R, n1))
            continue
        Dn = torch.full((R, n1), float("inf"), dtype=torch.float64, device=dev)
        arg = torch.zeros((R, n1), dtype=torch.int64, device=dev)
        Dflat = D.reshape(-1)
        # open segments: i in [ilo, ihi] (shared by all rows), split j in [jlo, jhi] (per row)
        ilo = torch.tensor([m], device=dev)
        ihi = torch.tensor([n], device=dev)
        jlo = torch.full((R, 1), m - 1, device=dev)
        jhi = torch.full((R, 1), n - 1, device=dev)
        while ilo.numel():
            nseg = ilo.numel()
            mid = (ilo + ihi) // 2
            jh = torch.minimum(jhi, (mid - 1)[None, :])
            count = (jh - jlo + 1).clamp_min(1).reshape(-1)
            seg = torch.repeat_interleave(torch.arange(R * nseg, device=dev), count)
            first = torch.cumsum(count, 0) - count
            j = jlo.reshape(-1)[seg] + (torch.arange(seg.numel(), device=dev) - first[seg])
            base = (seg // nseg) * n1
            val = Dflat[base + j] + cost(base + j, base + mid[seg % nseg])
            best = torch.full((R * nseg,), float("inf"), dtype=torch.float64, device=dev)
            best = best.scatter_reduce(0, seg, val, "amin")
            cand = torch.where(val == best[seg], j, torch.full_like(j, n1))
            where = torch.full((R * nseg,), n1, dtype=torch.int64, device=dev).scatter_reduce(0, seg, cand, "amin")
            best, where = best.view(R, nseg), where.view(R, nseg)
            Dn[:, mid] = best
            arg[:, mid] = where
            left, right = mid - 1 >= ilo, mid + 1 <= ihi
            ilo, ihi = torch.cat([ilo[left], (mid + 1)[right]]), torch.cat([(mid - 1)[left], ihi[right]])
            jlo, jhi = (torch.cat([jlo[:, left], where[:, right]], 1),
                        torch.cat([where[:, left], jhi[:, right]], 1))
        backs.append(arg)
        D = Dn
    ends = [torch.full((R,), n, dtype=torch.int64, device=dev)]
    for arg in reversed(backs):
        ends.append(torch.gather(arg, 1, ends[-1][:, None]).squeeze(1).clamp(0, n))
    ends.append(torch.zeros(R, dtype=torch.int64, device=dev))
    return torch.stack(ends[::-1], 1)  # [R, k+1], non-decreasing from 0 to n

"""Each shared parameter's exact contribution to G = J Jᵀ from recorded inputs and per-task output gradients.

Notation: T tasks; a call's rows a = 1..n (batch × tokens, flattened); δ_ia = ∂L_i/∂y_a, the gradient of task
i with respect to the call's output row a. Every supported module is linear in its parameters given its
input, so task i's gradient of a parameter is a contraction of the δ_i with what the call recorded, and the
Gram contribution is Σ_ij ⟨g_i, g_j⟩. A *group* is a set of parameters used by exactly the same calls (a
Linear's weight and bias; every call of a module applied several times, whose rows are concatenated: the
cross terms between calls come for free). Its contribution is formed in one of two ways:

* **materialise**: the group's T per-task gradients, as a (rows × cols) matrix each, chunk by chunk of rows
  (T·chunk·cols ≤ ``CHUNK_ELEMENTS``), each chunk's T×T Gram taken by ``gram_matrix`` (its float32 pieces
  summed in float64: one float32 product over a chunk of up to 2²²/T entries per task would put G up to 6×
  further from the float64 model's than the Jacobian source's, 1.6·10⁻⁴ against 2.7·10⁻⁵ relative on a
  1024-wide layer at batch 4096) and added in float64; the chunks are discarded.
  Linear: g_i = δ_iᵀ [X | 1] (bias as a column of ones), T·n·out·(in+1) flops. Embedding/EmbeddingBag:
  g_i = S_uᵀ δ_i over the u rows the batch touched (S: bags × touched rows, entry = the lookup's coefficient:
  1, 1/|bag| for mean, the per-sample weight, 1/frequency with ``scale_grad_by_freq``; per coordinate for
  max), T·nnz·dim flops and memory that follows the batch, not the table. Conv: the weight-gradient
  convolution per task (``convolution_backward``). LayerNorm/BatchNorm affine: g_i = Σ_a δ_ia ∘ x̂_a and
  Σ_a δ_ia with x̂ recomputed from the recorded input and the statistics the forward used.
* **kernel** (Linear, Embedding/EmbeddingBag sum/mean): G_ij = Σ_ab K_ab ⟨δ_ia, δ_jb⟩ = ⟨δ_j, K δ_i⟩ with
  K = X Xᵀ (+1 with a bias) or K = S Sᵀ, computed in row blocks A: P_A = K_A D (D: n × T·out, all tasks'
  δ side by side), G += Σ_{a∈A} δ_a P_aᵀ. Flops n²·in + n²·T·out + n·T²·out, memory |A|·(n + T·out): cheaper
  than materialising when the rows are few against the layer size (batch 128, 1024×1024, T = 8: 0.16 GFLOP
  against 1.1 GFLOP).

``choose_form`` picks the form with fewer flops (the memory of both is bounded by the chunking). Products run
in the parameters' precision (float32 at least) and are summed per chunk in ``gram_dtype``, as
``gradsurgery.gram`` does. Except for the materialised chunks' Grams, which are ``gram_matrix``'s (IEEE
float32 whatever the setting), they follow ``torch.set_float32_matmul_precision`` as the model's backward
does: they are compute-bound, and on an H200 with TF32 (``"high"``) taking them all in IEEE float32 made the
step up to 1.5-1.7× slower (the kernel form at batch 4096; 1.2-1.3× at batch 32768) while moving G by at most
1.3·10⁻⁴ relative, less than the 6.6-7.7·10⁻⁴ by which the model's TF32 backward moves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..gram import gram_matrix

if TYPE_CHECKING:
    from ._activation_record import Record

#: elements of one chunk's work buffer (T × rows × cols, or a kernel block): 16 MiB in float32
CHUNK_ELEMENTS = 1 << 22


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def concat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``torch.cat`` that returns a single part itself: a module called once is the common case, and its
    recorded tensors are not copied."""
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


class Rows:
    """A chunk of a group's rows: ``ids`` (sorted row numbers) or the range [start, stop)."""

    def __init__(self, start: int = 0, stop: int = 0, ids: torch.Tensor | None = None) -> None:
        self.ids, self.start, self.stop = ids, start, stop

    def __len__(self) -> int:
        return int(self.ids.numel()) if self.ids is not None else self.stop - self.start

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The chunk's rows of ``t`` along ``dim``."""
        if self.ids is not None:
            return t.index_select(dim, self.ids)
        return t.narrow(dim, self.start, self.stop - self.start)


class Group:
    """Parameters with the same calls; subclasses fill per-task gradient rows and may offer a kernel form.

    ``rows`` × ``cols`` is the members' gradients side by side (a member's gradient viewed as
    (rows, numel/rows)); ``params`` lists the members in column order.
    """

    params: list[torch.Tensor]
    rows: int
    cols: int
    num_tasks: int
    dtype: torch.dtype
    device: torch.device
    row_align: int = 1
    has_kernel: bool = False

    def touched(self) -> torch.Tensor | None:
        """Sorted row numbers that can be non-zero, or None for all rows."""
        return None

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        raise NotImplementedError

    def materialize_flops(self) -> float:
        raise NotImplementedError

    def kernel_flops(self) -> float:
        return math.inf

    def kernel_gram(self, gram_dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def direct_gram(self, gram_dtype: torch.dtype) -> torch.Tensor | None:
        """The materialised form's result by a cheaper exact route, where one applies (else None)."""
        return None

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Σ_i w_i g_i for each member (``fused="activations"``): the same contraction as one task's
        gradient, applied once to the combined output gradient Σ_i w_i δ_i."""
        raise NotImplementedError


def _combine(d: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ_i w_i d_i over the leading task axis of d, in ``dtype``."""
    combined: torch.Tensor = torch.tensordot(w.to(device=d.device, dtype=dtype), d.to(dtype), dims=1)
    return combined


def choose_form(group: Group, form: str) -> str:
    """ "kernel" or "materialize" for ``group`` under the user's ``form`` ("auto" compares flops)."""
    if not group.has_kernel or form == "materialize":
        return "materialize"
    if form == "kernel":
        return "kernel"
    return "kernel" if group.kernel_flops() < group.materialize_flops() else "materialize"


def _row_chunks(total: int, size: int, align: int) -> Iterator[Rows]:
    size = max(align, size - size % align)
    for start in range(0, total, size):
        yield Rows(start, min(total, start + size))


def materialize_gram(
    group: Group,
    gram_dtype: torch.dtype,
    ids: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Σ over row chunks of B Bᵀ, B the chunk of the T per-task gradients (T × chunk·cols), each by
    ``gram_matrix``.

    ``ids``: the rows to visit (default: ``group.touched()``, all rows when None). ``reduce``: called on each
    chunk buffer before its Gram (the data-parallel mean); every rank must then pass the same ``ids``.
    """
    t = group.num_tasks
    gram = torch.zeros(t, t, dtype=gram_dtype, device=group.device)
    per_row = max(1, t * group.cols)
    size = max(1, CHUNK_ELEMENTS // per_row)
    if ids is None:
        ids = group.touched()
    chunks: Iterable[Rows]
    if ids is None:
        chunks = _row_chunks(group.rows, size, group.row_align)
    elif ids.numel() <= size:
        chunks = [Rows(ids=ids)]  # the very tensor: groups recognise their own touched rows
    else:
        chunks = (Rows(ids=ids[s : s + size]) for s in range(0, ids.numel(), size))
    for rows in chunks:
        buf = torch.zeros(t, len(rows), group.cols, dtype=group.dtype, device=group.device)
        group.add_rows(buf, rows)
        if reduce is not None:
            reduce(buf)
        flat = buf.view(t, -1)
        gram += gram_matrix(flat, gram_dtype)
    return gram


def _kernel_contract(d_rows: torch.Tensor, p_rows: torch.Tensor, t: int) -> torch.Tensor:
    """Σ_a δ_a P_aᵀ for a block of rows: (A, T·c) × (A, T·c) → T×T."""
    a = d_rows.shape[0]
    return torch.bmm(d_rows.view(a, t, -1), p_rows.view(a, t, -1).transpose(1, 2)).sum(0)


def _stack_rows(deltas: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(T, n, c) per-task gradients → D (n, T·c): row a holds every task's δ_a side by side."""
    d = concat(deltas, dim=1)
    t, n, c = d.shape
    return d.to(dtype).permute(1, 0, 2).reshape(n, t * c)


# -- Linear --------------------------------------------------------------------------------------------------
class WeightBiasGroup(Group):
    """A layer's weight and bias, either of which may be absent."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def _take_params(self, weight: torch.Tensor | None, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
        """Keep a layer's weight and bias (either may be None) as the members; returns the first one."""
        ref = weight if weight is not None else bias
        if ref is None:
            raise ValueError(f"a {kind} group needs its weight, its bias or both")
        self.weight, self.bias = weight, bias
        self.params = [p for p in (weight, bias) if p is not None]
        self.dtype = work_dtype(ref.dtype)
        self.device = ref.device
        return ref


class LinearGroup(WeightBiasGroup):
    """Weight (out × in) and/or bias (out) of the calls ``xs[r]`` (n_r × in) with gradients ``ds[r]``
    (T × n_r × out). Columns: the weight's ``in``, then the bias."""

    has_kernel = True

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        xs: list[torch.Tensor],
        ds: list[torch.Tensor],
    ) -> None:
        self._take_params(weight, bias, "linear")
        self.x = concat(xs).to(self.dtype)
        self.d = concat(ds, dim=1)  # T × n × out
        self.num_tasks, self.n, self.out = self.d.shape
        self.inp = self.x.shape[1] if weight is not None else 0
        self.rows = self.out
        self.cols = self.inp + (1 if bias is not None else 0)
        self.has_kernel = weight is not None

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        d = rows.take(self.d, 2).to(self.dtype)  # T × n × r
        if self.weight is not None:
            buf[:, :, : self.inp] += torch.matmul(d.transpose(1, 2), self.x)
        if self.bias is not None:
            buf[:, :, self.inp] += d.sum(1)

    def materialize_flops(self) -> float:
        t = self.num_tasks
        return 2.0 * t * self.n * self.out * self.cols + 2.0 * t * t * self.out * self.cols

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        u = _combine(self.d, w, self.dtype)  # n × out
        out = []
        if self.weight is not None:
            out.append((self.weight, (u.T @ self.x).to(self.weight.dtype)))
        if self.bias is not None:
            out.append((self.bias, u.sum(0).to(self.bias.dtype)))
        return out

    def kernel_flops(self) -> float:
        t, n = self.num_tasks, self.n
        return 2.0 * n * n * self.inp + 2.0 * n * n * t * self.out + 2.0 * n * t * t * self.out

    def kernel_gram(self, gram_dtype: torch.dtype) -> torch.Tensor:
        t, n = self.num_tasks, self.n
        dflat = _stack_rows([self.d], self.dtype)
        gram = torch.zeros(t, t, dtype=gram_dtype, device=self.device)
        block = max(1, CHUNK_ELEMENTS // (n + t * self.out))
        for s in range(0, n, block):
            xa = self.x[s : s + block]
            k = xa @ self.x.T  # |A| × n
            if self.bias is not None:
                k += 1.0
            gram += _kernel_contract(dflat[s : s + block], k @ dflat, t).to(gram_dtype)
        return gram


# -- Embedding / EmbeddingBag --------------------------------------------------------------------------------
class Lookup:
    """One lookup call as a sparse linear map of the table: output row ``bags[e]`` += ``coef[e]`` ·
    table[``rows[e]``] for each entry e (sum/mean/Embedding), or, for max bags, output[b, k] = table[m, k]
    for the triples (``mbag``, ``mcoord``, ``mrow``)."""

    def __init__(
        self,
        rows: torch.Tensor,
        bags: torch.Tensor,
        coef: torch.Tensor | None,
        num_bags: int,
        d: torch.Tensor,
        mbag: torch.Tensor | None = None,
        mcoord: torch.Tensor | None = None,
        mrow: torch.Tensor | None = None,
    ) -> None:
        self.rows, self.bags, self.coef, self.num_bags, self.d = rows, bags, coef, num_bags, d
        self.mbag, self.mcoord, self.mrow = mbag, mcoord, mrow


def lookup_entries(rec: Record, d: torch.Tensor) -> Lookup:
    """The lookup map of a recorded Embedding/EmbeddingBag call; ``d`` is T × bags × dim."""
    cfg = rec.config
    idx = rec.inputs["indices"]
    weight = rec.params["weight"]
    pad = cfg["padding_idx"]
    if not cfg["bag"]:
        rows = idx.reshape(-1)
        bags = torch.arange(rows.numel(), device=rows.device)
        coef = None
        num_bags = rows.numel()
        mode = "sum"
    else:
        mode = cfg["mode"]
        if idx.dim() == 2:
            num_bags, length = idx.shape
            rows = idx.reshape(-1)
            bags = torch.arange(num_bags, device=idx.device).repeat_interleave(length)
            offsets = torch.arange(num_bags, device=idx.device) * length  # as F.embedding_bag builds them
        else:
            rows = idx
            offsets = rec.inputs["offsets"]
            if cfg["include_last_offset"]:
                num_bags = offsets.numel() - 1
                starts = offsets[:-1]
            else:
                num_bags = offsets.numel()
                starts = offsets
            bags = torch.searchsorted(starts, torch.arange(rows.numel(), device=idx.device), right=True) - 1
        psw = rec.inputs.get("per_sample_weights")
        coef = psw.detach().reshape(-1) if psw is not None else None
    rows = rows.long()
    keep = rows != pad if pad is not None else None
    if mode == "max":
        # The coordinates' argmax rows, from the same kernel as the forward (same tie-breaking); the table
        # is the forward's (its version is checked), empty bags have bag_size 0.
        with torch.no_grad():
            offs = offsets if idx.dim() == 2 else rec.inputs["offsets"]
            out = torch.ops.aten._embedding_bag_forward_only(
                weight.detach(),
                rows,
                offs.long(),
                False,
                2,
                False,
                None,
                bool(cfg["include_last_offset"]) if idx.dim() == 1 else False,
                -1 if pad is None else pad,
            )
        bag_size, max_idx = out[2], out[3]
        valid = (bag_size > 0).unsqueeze(1).expand_as(max_idx) & (max_idx >= 0)
        b, k = valid.nonzero(as_tuple=True)
        return Lookup(rows[:0], rows[:0], None, num_bags, d, mbag=b, mcoord=k, mrow=max_idx[b, k].long())
    if keep is not None:
        rows, bags = rows[keep], bags[keep]
        coef = coef[keep] if coef is not None else None
    if mode == "mean":
        counts = torch.bincount(bags, minlength=num_bags).to(
            d.dtype if d.is_floating_point() else torch.float
        )
        inv = 1.0 / counts.clamp(min=1)
        coef = inv[bags] if coef is None else coef * inv[bags]
    if cfg["scale_grad_by_freq"]:
        # Frequencies over the call's indices (torch counts every index, padding included).
        allrows = idx.reshape(-1).long()
        freq = torch.bincount(allrows, minlength=int(weight.shape[0]))
        scale = 1.0 / freq[rows].to(torch.float64)
        coef = scale if coef is None else coef * scale
    return Lookup(rows, bags, coef, num_bags, d)


class LookupGroup(Group):
    """An embedding table (V × dim) over one or more lookup calls; rows = the touched rows."""

    def __init__(self, weight: torch.Tensor, lookups: list[Lookup], sparse: bool = False) -> None:
        self.params = [weight]
        self.weight, self.sparse = weight, sparse  # sparse: every call asked for a sparse gradient
        self.dtype = work_dtype(weight.dtype)
        self.device = weight.device
        self.rows, self.cols = int(weight.shape[0]), int(weight.numel() // max(1, weight.shape[0]))
        offset = 0
        rows, bags, coefs, mrows, mbags, mcoords, ds = [], [], [], [], [], [], []
        for lk in lookups:
            rows.append(lk.rows)
            bags.append(lk.bags + offset)
            coefs.append(
                lk.coef.to(self.dtype)
                if lk.coef is not None
                else torch.ones(lk.rows.numel(), dtype=self.dtype, device=self.device)
            )
            if lk.mrow is not None and lk.mbag is not None and lk.mcoord is not None:  # set together
                mrows.append(lk.mrow)
                mbags.append(lk.mbag + offset)
                mcoords.append(lk.mcoord)
            ds.append(lk.d)
            offset += lk.num_bags
        self.num_bags = offset
        self.d = concat(ds, dim=1)  # T × bags × dim
        self.num_tasks = self.d.shape[0]
        rows_all, bags_all, coef_all = torch.cat(rows), torch.cat(bags), torch.cat(coefs)
        # In call order (for the whole-table fast paths) and sorted by row (for chunks of rows).
        self.b_bags = bags_all
        self.b_coef = None if all(lk.coef is None for lk in lookups) else coef_all
        # An Embedding without dropped (padding) entries: entry a is output row a, δ needs no gather.
        self.identity = rows_all.numel() == offset and bool(
            (bags_all == torch.arange(offset, device=bags_all.device)).all()
        )
        self.b_rows, self.b_coef_all = rows_all, coef_all
        self.has_max = bool(mrows)
        mr = torch.cat(mrows) if self.has_max else rows_all[:0]
        self.mu_rows = mr
        if self.has_max:
            self.mu_bags, self.mu_coords = torch.cat(mbags), torch.cat(mcoords)
        # Row-sorted copies, made only for chunks of rows (``_row_sorted``).
        self._by_row: tuple[torch.Tensor, ...] | None = None
        self._touched: torch.Tensor
        self._touched, inverse = torch.unique(torch.cat([rows_all, mr]), return_inverse=True)
        self.b_inv, self.m_inv = inverse[: rows_all.numel()], inverse[rows_all.numel() :]
        self.has_kernel = not self.has_max

    def touched(self) -> torch.Tensor:
        return self._touched

    def _entry_values(self) -> torch.Tensor:
        """coef_a · δ_i[bag_a] for every (sum/mean) entry, in call order: T × entries × dim."""
        vals = self.d if self.identity else self.d.index_select(1, self.b_bags)
        vals = vals.to(self.dtype)
        return vals if self.b_coef is None else vals * self.b_coef.view(1, -1, 1)

    def direct_gram(self, gram_dtype: torch.dtype) -> torch.Tensor | None:
        """When no row is looked up twice (a batch of a few hundred ids in a large table), g_i restricted to
        the touched rows is a permutation of the entries' values, so G = V Vᵀ with V the T × (entries·dim)
        values: no scatter and no row buffer."""
        if self.has_max or self._touched.numel() != self.b_inv.numel():
            return None
        return gram_matrix(self._entry_values().reshape(self.num_tasks, -1), gram_dtype)

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        t = self.num_tasks
        if rows.ids is self._touched:  # every touched row in one chunk: scatter by the unique() inverse
            buf.index_add_(1, self.b_inv, self._entry_values())
            if self.has_max:
                vals = self.d[:, self.mu_bags, self.mu_coords].to(self.dtype)
                buf.view(t, -1).index_add_(1, self.m_inv * self.cols + self.mu_coords, vals)
            return
        ids = rows.ids if rows.ids is not None else torch.arange(rows.start, rows.stop, device=self.device)
        if ids.numel() == 0:
            return
        lo, hi = ids[0], ids[-1]
        e_rows, _, _, m_rows, _, _ = self._row_sorted()
        for sorted_rows, fill in ((e_rows, self._fill_entries), (m_rows, self._fill_max)):
            if sorted_rows.numel() == 0:
                continue
            s = int(torch.searchsorted(sorted_rows, lo))
            e = int(torch.searchsorted(sorted_rows, hi, right=True))
            if e <= s:
                continue
            sel = sorted_rows[s:e]
            pos = torch.searchsorted(ids, sel)
            hit = ids[pos.clamp(max=ids.numel() - 1)] == sel
            fill(buf, s, e, pos, hit, t)

    def _row_sorted(self) -> tuple[torch.Tensor, ...]:
        """(entry rows, bags, coefficients, max-entry rows, bags, coordinates) sorted by row, made on first
        use."""
        if self._by_row is None:
            order = torch.argsort(self.b_rows, stable=True)
            by_row = [self.b_rows[order], self.b_bags[order], self.b_coef_all[order]]
            if self.has_max:
                order = torch.argsort(self.mu_rows, stable=True)
                by_row += [self.mu_rows[order], self.mu_bags[order], self.mu_coords[order]]
            else:
                by_row += [self.mu_rows, self.mu_rows, self.mu_rows]  # empty: there is no max entry
            self._by_row = tuple(by_row)
        return self._by_row

    def _fill_entries(
        self, buf: torch.Tensor, s: int, e: int, pos: torch.Tensor, hit: torch.Tensor, t: int
    ) -> None:
        _, e_bags, e_coef = self._row_sorted()[:3]
        bags, coef = e_bags[s:e][hit], e_coef[s:e][hit]
        vals = self.d.index_select(1, bags).to(self.dtype) * coef.view(1, -1, 1)
        buf.index_add_(1, pos[hit], vals)

    def _fill_max(
        self, buf: torch.Tensor, s: int, e: int, pos: torch.Tensor, hit: torch.Tensor, t: int
    ) -> None:
        _, m_bags, m_coords = self._row_sorted()[3:]
        bags, coords = m_bags[s:e][hit], m_coords[s:e][hit]
        flat = buf.view(t, -1)
        vals = self.d[:, bags, coords].to(self.dtype)
        flat.index_add_(1, pos[hit] * self.cols + coords, vals)

    def materialize_flops(self) -> float:
        t, u = self.num_tasks, self._touched.numel()
        nnz = self.b_rows.numel() + self.mu_rows.numel() / max(1, self.cols)
        return 2.0 * t * nnz * self.cols + 2.0 * t * t * u * self.cols

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Sparse COO over the touched rows when every call is ``sparse=True`` (as autograd gives it),
        else a dense table-sized gradient."""
        u = _combine(self.d, w, self.dtype)  # bags × dim
        shape = tuple(self.weight.shape)
        vals = u.index_select(0, self.b_bags) * self.b_coef_all.view(-1, 1)
        if self.sparse and not self.has_max:
            grad = torch.sparse_coo_tensor(
                self.b_rows.view(1, -1), vals.view(-1, *shape[1:]), shape, check_invariants=False
            ).coalesce()
            return [(self.weight, grad.to(self.weight.dtype))]
        grad = torch.zeros(shape, dtype=self.dtype, device=self.device)
        flat = grad.view(shape[0], -1)
        flat.index_add_(0, self.b_rows, vals)
        if self.has_max:
            flat.view(-1).index_add_(
                0, self.mu_rows * self.cols + self.mu_coords, u[self.mu_bags, self.mu_coords]
            )
        return [(self.weight, grad.to(self.weight.dtype))]

    def kernel_flops(self) -> float:
        t, b, nnz = self.num_tasks, self.num_bags, self.b_rows.numel()
        return 2.0 * nnz * b + 2.0 * b * b * t * self.cols + 2.0 * b * t * t * self.cols

    def kernel_gram(self, gram_dtype: torch.dtype) -> torch.Tensor:
        """K = S Sᵀ over the bags, S (bags × touched rows) sparse with the entries' coefficients."""
        t, b = self.num_tasks, self.num_bags
        gram = torch.zeros(t, t, dtype=gram_dtype, device=self.device)
        if self.b_rows.numel() == 0:
            return gram
        u = self._touched.numel()
        col, bags, coef = self.b_inv, self.b_bags, self.b_coef_all
        s = torch.sparse_coo_tensor(torch.stack([bags, col]), coef, (b, u), check_invariants=False).coalesce()
        dflat = _stack_rows([self.d], self.dtype)
        block = max(1, CHUNK_ELEMENTS // (u + b + t * self.cols))
        by_bag = torch.argsort(bags, stable=True)
        bag_sorted = bags[by_bag]
        for start in range(0, b, block):
            stop = min(b, start + block)
            lo = int(torch.searchsorted(bag_sorted, start))
            hi = int(torch.searchsorted(bag_sorted, stop))
            sel = by_bag[lo:hi]
            s_block_t = torch.zeros(u, stop - start, dtype=self.dtype, device=self.device)
            s_block_t.index_put_((col[sel], bags[sel] - start), coef[sel], accumulate=True)
            k = torch.sparse.mm(s, s_block_t).T  # (stop-start) × bags
            gram += _kernel_contract(dflat[start:stop], k @ dflat, t).to(gram_dtype)
        return gram


# -- Convolution ---------------------------------------------------------------------------------------------
def conv_input(rec: Record) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(the input as the convolution saw it, its padding argument, whether the input was unbatched)."""
    cfg = rec.config
    x = rec.inputs["input"].detach()
    unbatched = x.dim() == cfg["dims"] + 1
    if unbatched:
        x = x.unsqueeze(0)
    padding = cfg["padding"]
    if cfg["padding_mode"] != "zeros":
        x = F.pad(x, cfg["reversed_padding"], mode=cfg["padding_mode"])
        padding = (0,) * cfg["dims"]
    elif isinstance(padding, str):
        if padding == "same":  # as _ConvNd: total d·(k−1), the extra one on the right
            x = F.pad(x, cfg["reversed_padding"])
        padding = (0,) * cfg["dims"]
    return x, tuple(padding), unbatched


class ConvGroup(WeightBiasGroup):
    """Conv weight (out × in/groups × k…) and/or bias over one or more calls; materialised with the
    weight-gradient convolution per task. Row chunks are whole channel groups."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        calls: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], tuple[int, ...]]],
    ) -> None:
        self._take_params(weight, bias, "convolution")
        self.calls = calls  # (x, d: T × N × out × spatial, config, padding)
        cfg = calls[0][2]
        self.out = calls[0][1].shape[2]
        self.groups = cfg["groups"]
        self.row_align = self.out // self.groups
        self.num_tasks = calls[0][1].shape[0]
        self.rows = self.out
        self.wcols = int(weight.numel() // self.out) if weight is not None else 0
        self.cols = self.wcols + (1 if bias is not None else 0)

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        if rows.ids is not None:  # only in a group mixing families: take the channels' whole range
            lo, hi = int(rows.ids[0]), int(rows.ids[-1]) + 1
            lo, hi = lo - lo % self.row_align, hi + (-hi) % self.row_align
            tmp = torch.zeros(buf.shape[0], hi - lo, self.cols, dtype=buf.dtype, device=buf.device)
            self.add_rows(tmp, Rows(lo, hi))
            buf += tmp.index_select(1, rows.ids - lo)
            return
        r0, r1 = rows.start, rows.stop
        g_per = self.row_align
        g0, g1 = r0 // g_per, r1 // g_per
        for x, d, cfg, padding in self.calls:
            if self.weight is not None:
                in_per = x.shape[1] // self.groups
                xs = x[:, g0 * in_per : g1 * in_per].to(self.dtype)
                shape = [r1 - r0, in_per, *cfg["kernel_size"]]
                dummy = xs.new_empty(1).expand(shape)
                for i in range(self.num_tasks):
                    gw = torch.ops.aten.convolution_backward(
                        d[i, :, r0:r1].to(self.dtype),
                        xs,
                        dummy,
                        None,
                        list(cfg["stride"]),
                        list(padding),
                        list(cfg["dilation"]),
                        False,
                        [0] * cfg["dims"],
                        g1 - g0,
                        [False, True, False],
                    )[1]
                    buf[i, :, : self.wcols] += gw.reshape(r1 - r0, -1)
            if self.bias is not None:
                dims = [1] + list(range(3, d.dim()))
                buf[:, :, self.wcols] += d[:, :, r0:r1].to(self.dtype).sum(dims)

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gw = gb = None
        for x, d, cfg, padding in self.calls:
            u = _combine(d, w, self.dtype)  # N × out × spatial
            if self.weight is not None:
                dummy = u.new_empty(1).expand(self.weight.shape)
                g = torch.ops.aten.convolution_backward(
                    u,
                    x.to(self.dtype),
                    dummy,
                    None,
                    list(cfg["stride"]),
                    list(padding),
                    list(cfg["dilation"]),
                    False,
                    [0] * cfg["dims"],
                    self.groups,
                    [False, True, False],
                )[1]
                gw = g if gw is None else gw + g
            if self.bias is not None:
                g = u.sum([0] + list(range(2, u.dim())))
                gb = g if gb is None else gb + g
        out = []  # gw and gb are set: there is at least one call
        if self.weight is not None and gw is not None:
            out.append((self.weight, gw.to(self.weight.dtype)))
        if self.bias is not None and gb is not None:
            out.append((self.bias, gb.to(self.bias.dtype)))
        return out

    def materialize_flops(self) -> float:
        t = self.num_tasks
        flops = 0.0
        for _, d, _, _ in self.calls:
            spatial = d[0, 0, 0].numel() * d.shape[1]
            flops += 2.0 * t * spatial * self.out * self.cols
        return flops + 2.0 * t * t * self.out * self.cols


# -- LayerNorm / BatchNorm affine ----------------------------------------------------------------------------
def normalized_input(rec: Record) -> torch.Tensor:
    """x̂ of a recorded norm call, as (rows, features) with the affine parameters' layout on the last axis."""
    cfg = rec.config
    x = rec.inputs["input"].detach()
    dtype = work_dtype(x.dtype)
    x = x.to(dtype)
    if cfg["layer"]:
        dims = tuple(range(x.dim() - len(cfg["normalized_shape"]), x.dim()))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        xhat = (x - mean) * torch.rsqrt(var + cfg["eps"])
        return xhat.reshape(-1, math.prod(cfg["normalized_shape"]))
    # BatchNorm: channel axis 1 (input N×C or N×C×…), statistics per channel.
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if cfg["batch_stats"]:
        dims = (0,) + tuple(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    else:
        mean = cfg["running_mean"].to(dtype).view(shape)
        var = cfg["running_var"].to(dtype).view(shape)
    xhat = (x - mean) * torch.rsqrt(var + cfg["eps"])
    return xhat.movedim(1, -1).reshape(-1, x.shape[1])


def norm_delta(rec: Record, d: torch.Tensor) -> torch.Tensor:
    """T × rows × features, matching ``normalized_input``."""
    t = d.shape[0]
    if rec.config["layer"]:
        return d.reshape(t, -1, math.prod(rec.config["normalized_shape"]))
    return d.movedim(2, -1).reshape(t, -1, d.shape[2])


class NormGroup(WeightBiasGroup):
    """Affine weight and/or bias of LayerNorm/BatchNorm calls: g_w = Σ_a δ_a ∘ x̂_a, g_b = Σ_a δ_a."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        xhats: list[torch.Tensor],
        ds: list[torch.Tensor],
    ) -> None:
        ref = self._take_params(weight, bias, "norm")
        self.xhat = concat(xhats)
        self.d = concat(ds, dim=1)
        self.num_tasks = self.d.shape[0]
        self.rows = int(ref.shape[0]) if ref.dim() else 1
        self.inner = int(ref.numel() // self.rows)
        self.cols = self.inner * len(self.params)

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        t = self.num_tasks
        r = len(rows)
        feat = self._features(rows)
        d = self.d.index_select(2, feat).to(self.dtype)
        col = 0
        if self.weight is not None:
            xh = self.xhat.index_select(1, feat)
            buf[:, :, col : col + self.inner] += (d * xh).sum(1).view(t, r, self.inner)
            col += self.inner
        if self.bias is not None:
            buf[:, :, col : col + self.inner] += d.sum(1).view(t, r, self.inner)

    def _features(self, rows: Rows) -> torch.Tensor:
        ids = rows.ids if rows.ids is not None else torch.arange(rows.start, rows.stop, device=self.device)
        return (ids.view(-1, 1) * self.inner + torch.arange(self.inner, device=self.device)).reshape(-1)

    def materialize_flops(self) -> float:
        t = self.num_tasks
        return 4.0 * t * self.d.shape[1] * self.rows * self.inner + 2.0 * t * t * self.rows * self.cols

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        u = _combine(self.d, w, self.dtype)  # rows × features
        out = []
        if self.weight is not None:
            out.append((self.weight, (u * self.xhat).sum(0).view(self.weight.shape).to(self.weight.dtype)))
        if self.bias is not None:
            out.append((self.bias, u.sum(0).view(self.bias.shape).to(self.bias.dtype)))
        return out


# -- Several families for one parameter; per-task gradients from autograd ------------------------------------
class MixedGroup(Group):
    """One parameter used by calls of different families (an embedding table tied to a Linear output layer):
    the sum of each family's per-task gradient rows (materialised; the touched rows are all rows as soon as
    one family is dense)."""

    def __init__(self, param: torch.Tensor, parts: list[Group]) -> None:
        self.params = [param]
        self.parts = parts
        self.dtype = work_dtype(param.dtype)
        self.device = param.device
        self.num_tasks = parts[0].num_tasks
        self.rows = int(param.shape[0]) if param.dim() else 1
        self.cols = int(param.numel() // self.rows)
        self.row_align = math.lcm(*[p.row_align for p in parts])

    def touched(self) -> torch.Tensor | None:
        ids = [p.touched() for p in self.parts]
        present = [i for i in ids if i is not None]
        if len(present) < len(ids):  # some part touches every row
            return None
        union: torch.Tensor = torch.unique(torch.cat(present))
        return union

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        for part in self.parts:
            part.add_rows(buf, rows)

    def materialize_flops(self) -> float:
        return sum(p.materialize_flops() for p in self.parts)

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        total = None
        for part in self.parts:
            for _, g in part.fused(w):
                g = g.to_dense() if g.is_sparse else g
                total = g if total is None else total + g
        if total is None:  # cannot happen: every part has this parameter as a member
            total = torch.zeros_like(self.params[0])
        return [(self.params[0], total)]


class DirectGroup(Group):
    """A parameter whose per-task gradients autograd returned (the per-parameter path): dense tensors, or
    sparse COO ones (then only the rows some task touched are visited)."""

    def __init__(self, param: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
        self.params = [param]
        self.task_grads = grads
        self.dtype = work_dtype(param.dtype)
        self.device = param.device
        self.num_tasks = len(grads)
        self.rows = int(param.shape[0]) if param.dim() else 1
        self.cols = int(param.numel() // self.rows)
        self.sparse = any(g is not None and g.is_sparse for g in grads)
        if self.sparse:
            self.entries: list[tuple[int, torch.Tensor, torch.Tensor]] = []
            for i, g in enumerate(grads):
                if g is None:
                    continue
                g = g.coalesce() if g.is_sparse else g.to_sparse(1).coalesce()
                if g.sparse_dim() != 1:
                    g = g.to_dense().to_sparse(1).coalesce()
                self.entries.append((i, g.indices()[0], g.values().reshape(-1, self.cols)))
            self._touched: torch.Tensor | None = (
                torch.unique(torch.cat([e[1] for e in self.entries])) if self.entries else None
            )
        else:
            self.grads = grads

    def touched(self) -> torch.Tensor | None:
        if self.sparse:
            if self._touched is None:
                return torch.zeros(0, dtype=torch.long, device=self.device)
            return self._touched
        return None

    def add_rows(self, buf: torch.Tensor, rows: Rows) -> None:
        if self.sparse:
            ids = (
                rows.ids if rows.ids is not None else torch.arange(rows.start, rows.stop, device=self.device)
            )
            for i, idx, vals in self.entries:
                pos = torch.searchsorted(ids, idx)
                hit = ids[pos.clamp(max=ids.numel() - 1)] == idx
                buf[i].index_add_(0, pos[hit], vals[hit].to(self.dtype))
            return
        for i, g in enumerate(self.grads):
            if g is not None:
                buf[i] += rows.take(g.reshape(self.rows, self.cols), 0).to(self.dtype)

    def materialize_flops(self) -> float:
        return 2.0 * self.num_tasks**2 * self.rows * self.cols

    def fused(self, w: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        total = None
        for i, g in enumerate(self.task_grads):
            if g is None:
                continue
            g = g * w[i].to(device=g.device, dtype=g.dtype)
            total = g if total is None else total + g
        if total is None:
            total = torch.zeros_like(self.params[0])
        return [(self.params[0], total.coalesce() if total.is_sparse else total)]

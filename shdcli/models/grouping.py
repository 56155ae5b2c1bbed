"""Calibrated head grouping: choose which teacher heads each student head squeezes.

Head order inside a layer is arbitrary (heads 0, 1, 2 are no more alike than 0, 5, 9), so the
contiguous groups of shd.group_heads squeeze heads that merely sit side by side. Here the groups
are chosen on calibration data: a partition of the Ht heads into Hs groups with the balanced size
multiset (the sizes of group_heads(Ht, Hs, "balanced")) that minimises the mean squeeze error
||A~ S - T|| / ||T|| (shd.reconstruction_error, weights from shd.solve_weights) over samples and
groups.

Statistics, once per calibration set. For one sample, everything the squeeze of ANY group G needs
is a sum of the inner products (over valid query rows) of the H^2 products A_h X_a:
    Q[h, a, g, c] = <A_h X_a, A_g X_c>_F                                  Q: [S, H, H, H, H]
    G_hg = sum_{a,c in G} Q[h,a,g,c]      (= <A_h S, A_g S>,  S = sum_{a in G} X_a)
    b_h  = sum_{a,c in G} Q[h,a,c,c]      (= <A_h S, T>,      T = sum_{c in G} A_c X_c)
    ||T||^2 = sum_{a,c in G} Q[a,a,c,c],  ||A~ S - T||^2 = w^T G w - 2 w^T b + ||T||^2.
X_a = V_a W_O[a] for every head of the layer (the reduced per-group bases of
shd.group_feature_bases are exact only inside their own group, so one basis for the whole W_O is
used instead: exact for any group). Computing Q costs H^2 products [N, M] x [M, D'] and a Gram of
H^2 vectors of N D' entries per sample; after that a candidate group costs O(S k^4) and no map.
For teachers with many heads (H > 16, or S H^4 beyond STATS_BUDGET_BYTES) RecordCost keeps the
layer's q/k/v instead and evaluates each candidate group from its own maps, cached per group.

Search (deterministic for a seed): agglomerative merging from single heads, always the merge that
raises the total error least while the balanced sizes stay reachable; then local search (swap two
heads between groups, or move one head between groups whose sizes differ by one) while the error
falls. The same local search also runs from the contiguous partition and from a few seeded random
partitions; the best result is kept, so calibrated groups are never worse than contiguous ones on
the calibration data.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from shdcli.attention import capture
from shdcli.attention.shd import attention_maps, group_feature_bases, group_heads, solve_weights
from shdcli.models.families import enable_capture, model_shape, output_projection

STATS_BUDGET_BYTES = 2 * 2**30  # head statistics kept in memory during calibration (float32)
CHUNK_BUDGET_BYTES = 256 * 2**20  # one row chunk of the H^2 products A_h X_a


# --------------------------------------------------------------------------- statistics
def head_statistics(
    maps: torch.Tensor, feats: torch.Tensor, row_mask: torch.Tensor | None = None, basis: torch.Tensor | None = None
) -> torch.Tensor:
    """Q[b, h, a, g, c] = <A_h X_a, A_g X_c> summed over a block of query rows.

    maps [B, H, c, M] (rows of a chunk), row_mask [B, c] bool (padded rows excluded) or None.
    feats [B, H, M, D]: the features X_h; or, with basis [H, d, D'], the values V_h [B, H, M, d]
    and X_h = V_h basis_h, applied after the map ((A_h V_a) R_a costs d/D' of A_h (V_a R_a)).
    Returns [B, H, H, H, H] float64; chunks of rows add up.
    """
    bsz, heads = maps.shape[:2]
    if row_mask is not None:
        maps = maps * row_mask[:, None, :, None].to(maps.dtype)
    y = torch.matmul(maps.float()[:, :, None], feats.float()[:, None])  # A_h X_a (or A_h V_a): [B, H(h), H(a), c, .]
    if basis is not None:
        y = torch.matmul(y, basis.float()[None, None])  # (A_h V_a) R_a: [B, H, H, c, D']
    y = y.reshape(bsz, heads * heads, -1)
    gram = torch.matmul(y, y.transpose(1, 2))  # [B, H^2, H^2]
    return gram.double().reshape(bsz, heads, heads, heads, heads)


def layer_basis(w_out: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """One reduced basis R [H, d, D'] (D' = min(H d, D)) for a whole layer's W_O [H d, D] (x @ W
    orientation): <Y1 V_a R_a, Y2 V_c R_c> = <Y1 V_a W_O[a], Y2 V_c W_O[c]> for ANY heads a, c
    (shd.group_feature_bases with one group holding every head)."""
    return group_feature_bases(w_out.detach().float(), [list(range(heads))], head_dim)[0]


def record_statistics(
    record,
    w_out: torch.Tensor | None,
    row_mask: torch.Tensor | None = None,
    tau: float = 1.0,
    chunk_rows: int = 0,
) -> torch.Tensor:
    """Head statistics Q [B, H, H, H, H] (float64) of one captured teacher layer (capture.LayerRecord
    with values), X_h = V_h W_O[h] (V_h alone when w_out is None), maps softened by tau, rows in
    chunks so [B, H, H, c, D'] stays within CHUNK_BUDGET_BYTES."""
    values = record.values_per_head().float()  # [B, H, M, d]
    keys = record.keys_per_head()
    bsz, heads, n = record.query.shape[:3]
    basis = None if w_out is None else layer_basis(w_out, heads, values.shape[-1]).to(values.device)
    width = values.shape[-1] if basis is None else basis.shape[-1] + values.shape[-1]
    if not chunk_rows:
        per_row = bsz * heads * (heads * width + keys.shape[2]) * 4
        chunk_rows = max(1, min(n, CHUNK_BUDGET_BYTES // max(1, per_row)))
    total = None
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        allowed = record.allowed_rows(start, stop)
        maps = attention_maps(record.query[:, :, start:stop], keys, record.scaling, allowed, tau,
                              record.softcap)  # [B, H, c, M]
        rows = None if row_mask is None else row_mask[:, start:stop]
        part = head_statistics(maps, values, rows, basis)
        total = part if total is None else total + part
    return total


# --------------------------------------------------------------------------- cost of a group
def _group_blocks(stats: torch.Tensor, group: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G [S, k, k], b [S, k] and ||T||^2 [S] (float64) of one group from head statistics [S, H, H, H, H]."""
    idx = torch.as_tensor(group, dtype=torch.long, device=stats.device)
    sub = stats.index_select(1, idx).index_select(2, idx).index_select(3, idx).index_select(4, idx).double()
    gram = sub.sum(dim=(2, 4))  # G_hg = sum_{a,c} Q[h,a,g,c]
    rhs = torch.diagonal(sub, dim1=3, dim2=4).sum(dim=(2, 3))  # b_h = sum_{a,c} Q[h,a,c,c]
    t2 = torch.diagonal(torch.diagonal(sub, dim1=1, dim2=2), dim1=1, dim2=2).sum(dim=(1, 2))  # sum Q[a,a,c,c]
    return gram, rhs, t2


def squeeze_blocks(
    maps: torch.Tensor, feats: torch.Tensor, row_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """shd.squeeze_statistics plus ||T||^2, all float64: maps [B, k, c, M], feats [B, k, M, D] ->
    G [B, k, k], b [B, k], ||T||^2 [B], sums over the (valid) rows of the block."""
    if row_mask is not None:
        maps = maps * row_mask[:, None, :, None].to(maps.dtype)
    p = torch.matmul(maps, feats.sum(dim=1).unsqueeze(1))  # A_h S: [B, k, c, D]
    t = torch.matmul(maps, feats).sum(dim=1)  # T: [B, c, D]
    gram = torch.einsum("bhcd,bgcd->bhg", p, p).double()
    return gram, torch.einsum("bhcd,bcd->bh", p, t).double(), t.double().pow(2).sum(dim=(1, 2))


class GroupCost:
    """Squeeze error of candidate groups from head statistics Q [S, H, H, H, H]; the mean over
    samples is cached by the group's sorted heads (the search asks for the same groups often)."""

    def __init__(self, stats: torch.Tensor | None, mode: str = "lsq") -> None:
        if stats is not None and (stats.dim() != 5 or len(set(stats.shape[1:])) != 1):
            raise ValueError(f"head statistics must be [S, H, H, H, H], got {list(stats.shape)}")
        self.stats = stats
        self.mode = mode
        self.cache: dict[tuple[int, ...], float] = {}
        if stats is not None:
            self.samples, self.heads = stats.shape[0], stats.shape[1]

    def blocks(self, group: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G [S, k, k], b [S, k], ||T||^2 [S] of the group (heads in the given order)."""
        return _group_blocks(self.stats, group)

    def errors(self, group: Iterable[int], mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample relative error ||A~ S - T|| / ||T|| [S] and weights [S, k] (heads in the given order).

        The same quantity as shd.reconstruction_error(maps[:, group], feats[:, group], w) with
        w = shd.solve_weights(*shd.squeeze_statistics(maps[:, group], feats[:, group]), mode).
        """
        group = list(group)
        if len(group) == 1:
            return torch.zeros(self.samples, dtype=torch.float64), torch.ones(self.samples, 1)
        gram, rhs, t2 = self.blocks(group)
        w = solve_weights(gram, rhs, mode or self.mode)
        wd = w.double()
        err2 = torch.einsum("sh,shg,sg->s", wd, gram, wd) - 2 * (wd * rhs).sum(-1) + t2
        return (err2.clamp_min(0.0) / t2.clamp_min(1e-300)).sqrt().cpu(), w.cpu()

    def __call__(self, group: Iterable[int]) -> float:
        key = tuple(sorted(group))
        if key not in self.cache:
            self.cache[key] = 0.0 if len(key) == 1 else float(self.errors(key)[0].mean())
        return self.cache[key]

    def total(self, groups: Iterable[Iterable[int]]) -> float:
        return sum(self(g) for g in groups)


class RecordCost(GroupCost):
    """The same costs computed per candidate group from the kept q/k/v of one layer, for teachers
    with many heads where Q's S H^4 entries (and H^4 N D' work per sample) are too much: a group of
    k heads costs k maps and O(k N M k d) per sample, with the group's own reduced W_O basis."""

    def __init__(self, records: list, row_masks: list[torch.Tensor | None], w_out: torch.Tensor | None,
                 tau: float = 1.0, mode: str = "lsq") -> None:
        super().__init__(None, mode)
        self.records, self.row_masks, self.w_out, self.tau = records, row_masks, w_out, tau
        self.samples = sum(r.query.shape[0] for r in records)
        self.heads = records[0].query.shape[1]

    def blocks(self, group: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out: list[list[torch.Tensor]] = [[], [], []]
        basis = None
        for rec, rows in zip(self.records, self.row_masks):
            v = rec.values_per_head()[:, group].float()  # [B, k, M, d]
            if self.w_out is not None and basis is None:
                basis = group_feature_bases(self.w_out, [group], v.shape[-1])[0].to(v.device)  # [k, d, D']
            feats = v if basis is None else torch.einsum("bkmd,kde->bkme", v, basis)
            keys = rec.keys_per_head()[:, group]
            bsz, k, n = rec.query.shape[0], len(group), rec.query.shape[2]
            chunk = max(1, min(n, CHUNK_BUDGET_BYTES // max(1, bsz * k * (keys.shape[2] + 2 * feats.shape[-1]) * 4)))
            acc = None
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                maps = attention_maps(rec.query[:, group, start:stop], keys, rec.scaling,
                                      rec.allowed_rows(start, stop), self.tau, rec.softcap)
                part = squeeze_blocks(maps, feats, None if rows is None else rows[:, start:stop])
                acc = part if acc is None else tuple(x + y for x, y in zip(acc, part))
            for lst, x in zip(out, acc):
                lst.append(x.cpu())
        return tuple(torch.cat(x) for x in out)


# --------------------------------------------------------------------------- search
@functools.lru_cache(maxsize=200_000)
def _packable(items: tuple[int, ...], bins: tuple[int, ...]) -> bool:
    """Can clusters of sizes `items` (sorted descending) fill bins of capacities `bins` exactly?

    Complete search: the largest cluster goes into each distinct bin it fits, recursively."""
    if not items:
        return not bins
    first, rest = items[0], items[1:]
    tried = set()
    for i, cap in enumerate(bins):
        if cap < first or cap in tried:
            continue
        tried.add(cap)
        left = cap - first
        remaining = bins[:i] + bins[i + 1:] + ((left,) if left else ())
        if _packable(rest, tuple(sorted(remaining, reverse=True))):
            return True
    return False


def agglomerate(cost: GroupCost, heads: int, sizes: list[int]) -> list[tuple[int, ...]]:
    """Merge clusters (from single heads) pairwise, cheapest rise in total error first, keeping the
    target size multiset reachable, until len(sizes) groups remain."""
    bins = tuple(sorted(sizes, reverse=True))
    clusters: list[tuple[int, ...]] = [(h,) for h in range(heads)]
    while len(clusters) > len(sizes):
        best = None
        for i, j in itertools.combinations(range(len(clusters)), 2):
            union = tuple(sorted(clusters[i] + clusters[j]))
            if len(union) > bins[0]:
                continue
            rest = [len(c) for n, c in enumerate(clusters) if n not in (i, j)] + [len(union)]
            if not _packable(tuple(sorted(rest, reverse=True)), bins):
                continue
            key = (cost(union) - cost(clusters[i]) - cost(clusters[j]), union)
            if best is None or key < best[0]:
                best = (key, i, j)
        assert best is not None, "a feasible merge always exists while clusters exceed groups"
        _, i, j = best
        merged = tuple(sorted(clusters[i] + clusters[j]))
        clusters = [c for n, c in enumerate(clusters) if n not in (i, j)] + [merged]
    return clusters


def local_search(cost: GroupCost, groups: list[tuple[int, ...]], tol: float = 1e-12) -> list[tuple[int, ...]]:
    """Best-improvement local search: swap two heads of two groups, or move one head from a group to
    one exactly one smaller (the size multiset is kept), while the total error falls."""
    groups = [tuple(sorted(g)) for g in groups]
    while True:
        best = None
        for i, j in itertools.combinations(range(len(groups)), 2):
            gi, gj = groups[i], groups[j]
            base = cost(gi) + cost(gj)
            moves = [(tuple(sorted(set(gi) - {h} | {g})), tuple(sorted(set(gj) - {g} | {h}))) for h in gi for g in gj]
            if len(gi) == len(gj) + 1:
                moves += [(tuple(h2 for h2 in gi if h2 != h), tuple(sorted(gj + (h,)))) for h in gi]
            if len(gj) == len(gi) + 1:
                moves += [(tuple(sorted(gi + (h,))), tuple(h2 for h2 in gj if h2 != h)) for h in gj]
            for ni, nj in moves:
                delta = cost(ni) + cost(nj) - base
                if delta < -tol and (best is None or (delta, ni, nj) < best[0]):
                    best = ((delta, ni, nj), i, j)
        if best is None:
            return groups
        (_, ni, nj), i, j = best
        groups[i], groups[j] = ni, nj


def _random_partition(heads: int, sizes: list[int], gen: torch.Generator) -> list[tuple[int, ...]]:
    perm = torch.randperm(heads, generator=gen).tolist()
    out, start = [], 0
    for size in sizes:
        out.append(tuple(sorted(perm[start:start + size])))
        start += size
    return out


@dataclass
class LayerGrouping:
    """The chosen groups of one teacher layer and their errors on the calibration samples."""

    groups: list[list[int]]  # groups[j]: teacher heads squeezed into student head j (sorted by first head)
    representatives: list[int]  # per group, the head with the largest mean lsq weight (student init)
    error: float  # mean over groups and samples of the relative squeeze error, chosen groups
    contiguous_error: float  # the same for shd.group_heads(Ht, Hs, "balanced")
    group_errors: list[float]

    def to_dict(self) -> dict:
        return {
            "groups": self.groups,
            "representatives": self.representatives,
            "error": self.error,
            "contiguous_error": self.contiguous_error,
            "group_errors": self.group_errors,
        }


def representatives(cost: GroupCost, groups: list[list[int]]) -> list[int]:
    """Per group, the head with the largest mean least-squares weight (first such head on ties):
    the teacher head whose q/k/v/o slices the student head starts from."""
    out = []
    for g in groups:
        mean_w = cost.errors(g, "lsq")[1].double().mean(dim=0)
        out.append(g[int(torch.argmax(mean_w))])
    return out


def choose_groups(
    source: torch.Tensor | GroupCost, hs: int, mode: str = "lsq", seed: int = 0, restarts: int = 4
) -> LayerGrouping:
    """Partition the H heads of one layer into hs balanced groups minimising the mean squeeze error.

    source: head statistics [S, H, H, H, H] of the calibration samples (head_statistics /
    record_statistics, concatenated over batches), or a GroupCost (e.g. a RecordCost). mode: the
    squeeze weights the error uses (lsq, mean, select). Deterministic for a given seed (it seeds
    only the random restarts).
    """
    cost = source if isinstance(source, GroupCost) else GroupCost(source, mode)
    # Statistics-based costs are thousands of tiny tensor ops: one thread avoids the thread pool's
    # overhead (30x per op on a busy CPU); per-candidate costs (RecordCost) keep their threads.
    with _threads(1 if type(cost) is GroupCost else torch.get_num_threads()):
        return _choose(cost, hs, seed, restarts)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _choose(cost: GroupCost, hs: int, seed: int, restarts: int) -> LayerGrouping:
    heads = cost.heads
    contiguous = group_heads(heads, hs, "balanced")
    sizes = [len(g) for g in contiguous]
    starts = [[tuple(g) for g in contiguous]]
    if 1 < hs < heads:
        starts.append(agglomerate(cost, heads, sizes))
        gen = torch.Generator().manual_seed(int(seed))
        starts += [_random_partition(heads, sizes, gen) for _ in range(restarts)]
    results = [local_search(cost, s) for s in starts]
    totals = [cost.total(r) for r in results]
    best = results[min(range(len(results)), key=lambda i: (totals[i], i))]  # ties: the earliest (contiguous)
    groups = sorted([list(g) for g in best], key=lambda g: g[0])
    return LayerGrouping(
        groups=groups,
        representatives=representatives(cost, groups),
        error=cost.total(groups) / hs,
        contiguous_error=cost.total(contiguous) / hs,
        group_errors=[cost(g) for g in groups],
    )


class SubsetCost(GroupCost):
    """A GroupCost over a subset of a layer's heads, in local indices 0..len(heads)-1 (a search
    confined to the query heads of one key/value head)."""

    def __init__(self, base: GroupCost, heads: list[int]) -> None:
        super().__init__(None, base.mode)
        self.base, self.subset = base, list(heads)
        self.samples, self.heads = base.samples, len(self.subset)

    def blocks(self, group: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base.blocks([self.subset[h] for h in group])


def choose_groups_within(
    source: torch.Tensor | GroupCost, blocks: list[list[int]], per_block: int, mode: str = "lsq", seed: int = 0,
    restarts: int = 4,
) -> LayerGrouping:
    """choose_groups confined to blocks of heads: each block (e.g. the query heads of one teacher
    KV head) is split into `per_block` groups on its own, so no group spans two blocks. Heads outside
    every block are left out. Errors are means over all chosen groups."""
    cost = source if isinstance(source, GroupCost) else GroupCost(source, mode)
    groups, reps, errors, contiguous, group_errors = [], [], 0.0, 0.0, []
    for block in blocks:
        local = choose_groups(SubsetCost(cost, block), per_block, mode, seed, restarts)
        groups += [[block[h] for h in g] for g in local.groups]
        reps += [block[h] for h in local.representatives]
        errors += local.error * per_block
        contiguous += local.contiguous_error * per_block
        group_errors += local.group_errors
    n = max(1, len(groups))
    return LayerGrouping(groups=groups, representatives=reps, error=errors / n, contiguous_error=contiguous / n,
                         group_errors=group_errors)


def calibrate_groups(
    stats_by_layer: dict[int, torch.Tensor | GroupCost], hs: int, mode: str = "lsq", seed: int = 0, restarts: int = 4
) -> dict[int, LayerGrouping]:
    """choose_groups per teacher layer: {layer: head statistics [S, H, H, H, H] (or a GroupCost)}
    -> {layer: LayerGrouping (groups, representatives, error, contiguous_error, group_errors)}."""
    return {layer: choose_groups(src, hs, mode, seed, restarts) for layer, src in sorted(stats_by_layer.items())}


# --------------------------------------------------------------------------- from a teacher
def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["input_ids"] if "input_ids" in batch else batch["pixel_values"])


def _forward(teacher: torch.nn.Module, layers: list[int], batches: list[dict[str, torch.Tensor]],
             device: torch.device) -> Iterator[tuple[dict, torch.Tensor]]:
    """Per calibration batch: ({layer: capture.LayerRecord with values}, valid rows [B, N] bool or None)."""
    enable_capture(teacher)
    recorder = capture.AttentionRecorder(layers, keep_values=True)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode(), recorder.active():
            teacher(**batch)
            records = dict(recorder.records)
        yield records, batch["attention_mask"].bool() if "attention_mask" in batch else None  # None: images


def calibrate_teacher(
    teacher: torch.nn.Module,
    layers: list[int],
    batches: list[dict[str, torch.Tensor]],
    hs: int,
    device: torch.device | str = "cpu",
    mode: str = "lsq",
    tau: float = 1.0,
    seed: int = 0,
    max_stats_heads: int = 16,
    blocks: dict[int, list[list[int]]] | None = None,
) -> dict[int, LayerGrouping]:
    """Run the teacher (already on `device`) on calibration batches and choose groups per layer.

    blocks: per layer, blocks of heads no group may span (the query heads of each kept teacher KV
    head); then `hs` is the number of groups per block (choose_groups_within).

    Up to max_stats_heads heads (and while S H^4 float32 statistics per layer fit
    STATS_BUDGET_BYTES) the head statistics Q are computed for as many layers per pass over the
    batches as fit; beyond that each layer keeps its q/k/v and candidate groups are evaluated one
    by one (RecordCost), one layer per pass.
    """
    heads = model_shape(teacher.config).heads
    samples = sum(_batch_size(b) for b in batches)
    layers = sorted(set(layers))
    per_layer = samples * heads**4 * 4
    use_stats = heads <= max_stats_heads and per_layer <= STATS_BUDGET_BYTES
    per_pass = max(1, STATS_BUDGET_BYTES // per_layer) if use_stats else 1
    out: dict[int, LayerGrouping] = {}
    with torch.inference_mode():
        for first in range(0, len(layers), per_pass):
            todo = layers[first:first + per_pass]
            w_out = {t: output_projection(teacher, t).detach().float() for t in todo}
            if use_stats:
                parts: dict[int, list[torch.Tensor]] = {t: [] for t in todo}
                for records, rows in _forward(teacher, todo, batches, device):
                    for t in todo:
                        parts[t].append(record_statistics(records[t], w_out[t], rows, tau).float().cpu())
                sources = {t: GroupCost(torch.cat(p), mode) for t, p in parts.items()}
            else:
                kept = list(_forward(teacher, todo, batches, device))
                sources = {todo[0]: RecordCost([r[todo[0]] for r, _ in kept], [m for _, m in kept], w_out[todo[0]],
                                               tau, mode)}
            for t, src in sources.items():
                out[t] = (choose_groups(src, hs, mode, seed) if blocks is None
                          else choose_groups_within(src, blocks[t], hs, mode, seed))
    return out


def calibrate_plan(plan, teacher: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                   mode: str = "lsq", tau: float = 1.0, seed: int = 0) -> dict[int, LayerGrouping]:
    """Choose calibrated groups for every mapped teacher layer of a mapping.Plan and write them into
    it (groups, representatives, calibration errors). The teacher runs on `device` and goes back to
    where it was (a derived student is initialised from it on the CPU afterwards)."""
    if plan.student.heads >= plan.teacher.heads:
        return {}  # identity grouping: nothing to choose
    home = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval().to(device)
    try:
        chosen = calibrate_teacher(teacher, [t for _, t in plan.pairs], batches, plan.student.heads, device, mode,
                                   tau, seed)
    finally:
        teacher.to(home).train(was_training)
    plan.groups = [[list(g) for g in chosen[t].groups] for _, t in plan.pairs]
    plan.representatives = [list(chosen[t].representatives) for _, t in plan.pairs]
    samples = sum(_batch_size(b) for b in batches)
    plan.calibration = [
        {"teacher_layer": t, "samples": samples, "error": chosen[t].error,
         "contiguous_error": chosen[t].contiguous_error}
        for _, t in plan.pairs
    ]
    return chosen

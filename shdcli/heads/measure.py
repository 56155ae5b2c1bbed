"""The numbers of `shd inspect-heads`: how alike a model's heads attend, and what squeezing them costs.

Per layer, from q/k/v captured over a few text samples (capture.py; no `output_attentions`):
  - js [H, H]: Jensen-Shannon divergence (nats) between the attention maps of every two heads,
    averaged over samples and valid query rows (padding excluded). Bounded by ln 2.
  - redundancy = 1 - mean off-diagonal JS / ln 2, in [0, 1]: 1 when every head attends exactly
    like every other (the paper's Figure 1), 0 when every two heads attend to disjoint keys.
  - for a target head count K: the groups (balanced by default; any per-layer grouping can be
    passed in as a `Grouper`), the per-sample squeeze weights w of each group (shd.solve_weights,
    `lsq`), their mean and spread (the paper's Figure 3), and the relative Frobenius error
    ||A~ S - T|| / ||T|| of the squeezed group against the group's true output (shd.reconstruction_error),
    for lsq, mean (fixed alpha) and select (hard selection). A layer's error pools its groups by
    output energy, sqrt(sum_j ||E_j||^2 / sum_j ||T_j||^2), and is averaged over samples.
  - suggested_heads: the smallest K (1..H) whose lsq error is at most the tolerance.

Everything is computed by `inspect_heads` into a plain `HeadsReport` (numbers only); rendering
(report.py, plots.py) reads only that report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from shdcli.attention import capture
from shdcli.attention.losses import group_features
from shdcli.attention.shd import (
    attention_maps,
    group_feature_bases,
    group_heads,
    js_divergence,
    reconstruction_error,
    solve_weights,
    squeeze_statistics,
)
from shdcli.errors import ShdError
from shdcli.models.families import enable_capture, model_shape, output_projection

LN2 = math.log(2.0)
MODES = ("lsq", "mean", "select")

# (layer, K) -> K groups of that layer's heads. The default is shd.group_heads(H, K, mode); a
# calibrated grouping (groups chosen per layer from data) plugs in here without touching the math.
Grouper = Callable[[int, int], list[list[int]]]


def default_heads(heads: int) -> int:
    """Default target head count: half the heads, rounded up, at least 1."""
    return max(1, math.ceil(heads / 2))


def fixed_grouper(heads: int, mode: str = "balanced") -> Grouper:
    return lambda layer, k: group_heads(heads, k, mode)


def groups_per_layer_grouper(heads: int, target: int, groups: dict[int, list[list[int]]],
                             mode: str = "balanced") -> Grouper:
    """Use the given groups for the target K of the layers listed, `mode` groups everywhere else."""

    def grouper(layer: int, k: int) -> list[list[int]]:
        if k == target and layer in groups:
            return groups[layer]
        return group_heads(heads, k, mode)

    return grouper


# --------------------------------------------------------------------------- pure math
def redundancy_score(js: torch.Tensor) -> float:
    """1 - mean off-diagonal JS / ln 2 of a [H, H] JS matrix; 1 = all heads attend alike."""
    h = js.shape[0]
    if h < 2:
        return 1.0
    off = ~torch.eye(h, dtype=torch.bool)
    return float(1.0 - js[off].mean() / LN2)


def pairwise_js(maps: torch.Tensor, row_mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Sum over valid query rows of JS(A_h[row], A_g[row]) for every head pair, and the row count.

    maps [B, H, N, M] (rows sum to 1, masked keys 0), row_mask [B, N] bool or None.
    Returns ([H, H] float64 sums, number of valid rows); divide to get the mean.
    """
    bsz, heads, n, _ = maps.shape
    keep = torch.ones(bsz, n, dtype=torch.bool, device=maps.device) if row_mask is None else row_mask.bool()
    out = torch.zeros(heads, heads, dtype=torch.float64)
    for h in range(heads):  # one head against all: [B, H, N] at a time, not [B, H, H, N, M]
        js = js_divergence(maps[:, h:h + 1], maps)
        out[h] = torch.where(keep[:, None, :], js, torch.zeros_like(js)).sum(dim=(0, 2)).double().cpu()
    return out, float(keep.sum())


# --------------------------------------------------------------------------- the report
@dataclass
class GroupStats:
    heads: list[int]
    weight_mean: list[float]  # lsq weight of each head in the group, mean over samples
    weight_std: list[float]
    error: dict[str, float]  # alpha mode -> mean over samples of ||A~ S - T|| / ||T|| for this group
    alpha: list[float]  # per sample: the weight of the group's first head (the paper's alpha for a pair)


@dataclass
class LayerStats:
    layer: int
    redundancy: float
    mean_js: float
    js: list[list[float]]  # [H, H], nats
    groups: list[GroupStats]
    error: dict[str, float]  # alpha mode -> layer's relative reconstruction error at the target K
    error_by_heads: dict[int, float]  # K -> lsq layer error (K = 1..H)
    suggested_heads: int
    # With compare_contiguous: lsq layer error of the contiguous groups shd.group_heads(H, K) at the
    # target K on the same samples, for `--grouping calibrated` to show its groups against them.
    contiguous_error: float | None = None
    # `--grouping calibrated`: grouping.LayerGrouping.to_dict() of this layer, errors on the calibration samples
    calibration: dict | None = None


@dataclass
class HeadsReport:
    model: str
    folder: str
    model_type: str
    task: str
    layers: int
    heads: int
    kv_heads: int
    data: str
    samples: int
    rows: int  # valid query rows the statistics average over, per layer
    seq_len: int
    target_heads: int
    tolerance: float
    grouping: str
    features: str  # what X_h is: "V W_O" (per-head output) or "V"
    layer_stats: list[LayerStats]
    sample_index: int = 0
    sample_tokens: list[str] = field(default_factory=list)
    sample_maps: torch.Tensor | None = None  # [L, H, n, n] of the chosen sample (plots only)
    calibration_samples: int = 0  # `--grouping calibrated`: samples the groups were chosen on
    calibration_heldout: bool = False  # whether those are disjoint from the `samples` measured

    @property
    def suggested_total(self) -> int:
        return sum(s.suggested_heads for s in self.layer_stats)

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("sample_maps",)}
        for layer in out["layer_stats"]:
            layer["error_by_heads"] = {str(k): v for k, v in layer["error_by_heads"].items()}
        out["summary"] = {
            "mean_redundancy": sum(s.redundancy for s in self.layer_stats) / max(1, len(self.layer_stats)),
            "suggested_total_heads": self.suggested_total,
            "teacher_total_heads": self.heads * self.layers,
            "mean_error": {m: sum(s.error[m] for s in self.layer_stats) / max(1, len(self.layer_stats))
                           for m in MODES},
        }
        return out


class _LayerAccumulator:
    """Running sums for one layer over batches."""

    def __init__(self, heads: int, target: int, target_groups: list[list[int]]) -> None:
        self.js = torch.zeros(heads, heads, dtype=torch.float64)
        self.rows = 0.0
        self.target = target
        self.target_groups = target_groups
        self.weights: list[list[torch.Tensor]] = [[] for _ in target_groups]  # per group: [B, k] lsq weights
        self.errors: dict[str, list[torch.Tensor]] = {m: [] for m in MODES}  # [B] layer errors at the target K
        self.group_errors: dict[str, list[torch.Tensor]] = {m: [] for m in MODES}  # [B, groups]
        self.sweep: dict[int, list[torch.Tensor]] = {}  # K -> [B] lsq layer errors


def gram_error(gram: torch.Tensor, rhs: torch.Tensor, t_sq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """||sum_h w_h A_h S - T||^2 / ||T||^2 from the squeeze statistics: (w'Gw - 2 b'w + ||T||^2) / ||T||^2.

    gram [B, k, k], rhs [B, k] (shd.squeeze_statistics), t_sq [B] = ||T||^2, w [B, k] -> [B] (squared
    relative error). Equals shd.reconstruction_error(...)^2 without recomputing the products.
    """
    g, b, w = gram.double(), rhs.double(), w.double()
    err = torch.einsum("bk,bkl,bl->b", w, g, w) - 2 * (w * b).sum(-1) + t_sq.double()
    return err.clamp_min(0.0) / t_sq.double().clamp_min(1e-30)


def _group_errors(
    maps: torch.Tensor, feats: list[torch.Tensor] | None, groups: list[list[int]], modes, row_mask: torch.Tensor,
    exact: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]:
    """Relative reconstruction errors of squeezing one layer's heads into `groups`, per alpha mode.

    maps [B, H, N, M]; feats: one [B, k, M, D'] per group (None when every group is one head).
    Padded query rows are zeroed in the maps, so they count neither in the statistics nor in the error.
    Returns (layer error {mode: [B]}, group error {mode: [B, G]}, lsq weights: one [B, k] per group).
    A group's error is ||A~ S - T|| / ||T|| (shd.reconstruction_error when exact, else the same number
    from the Gram statistics, `gram_error`, for the cheap sweep over K); the layer's pools the groups by
    output energy, sqrt(sum_j ||E_j||^2 / sum_j ||T_j||^2): the share of the layer's head output the
    squeeze loses (a lone head loses nothing but its output counts).
    """
    bsz = maps.shape[0]
    group_err = {m: torch.zeros(bsz, len(groups), dtype=torch.float64) for m in modes}
    weights = [torch.ones(bsz, 1) if len(g) == 1 else None for g in groups]
    if feats is None:
        return {m: torch.zeros(bsz, dtype=torch.float64) for m in modes}, group_err, weights
    masked = maps if row_mask is None else maps * row_mask[:, None, :, None].to(maps.dtype)
    energy = torch.zeros(bsz, dtype=torch.float64)
    lost = {m: torch.zeros(bsz, dtype=torch.float64) for m in modes}
    by_size: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        by_size.setdefault(len(g), []).append(j)
    # Groups of one size are stacked into the batch dimension (B*G), so the squeeze runs once per size.
    for k, members in by_size.items():
        n_g = len(members)
        idx = torch.tensor([groups[j] for j in members], device=maps.device)  # [G, k]
        sub = masked[:, idx].flatten(0, 1)  # [B*G, k, N, M]
        x = torch.stack([feats[j] for j in members], dim=1).flatten(0, 1)  # [B*G, k, M, D']
        t_sq = torch.matmul(sub, x).sum(dim=1).flatten(1).pow(2).sum(dim=-1)  # ||T_j||^2: [B*G]
        energy += t_sq.double().cpu().view(bsz, n_g).sum(dim=1)
        if k == 1:  # a lone head is passed through: nothing is lost
            continue
        gram, rhs = squeeze_statistics(sub, x)
        for m in modes:
            w = solve_weights(gram, rhs, m)  # [B*G, k]
            if exact:
                rel = reconstruction_error(sub, x, w)
            else:
                rel = gram_error(gram, rhs, t_sq, w).sqrt()
            rel = rel.double().cpu().view(bsz, n_g)
            group_err[m][:, members] = rel
            lost[m] += (rel**2 * t_sq.double().cpu().view(bsz, n_g)).sum(dim=1)
            if m == "lsq":
                w = w.cpu().view(bsz, n_g, k)
                for c, j in enumerate(members):
                    weights[j] = w[:, c]
    layer_err = {m: (lost[m] / energy.clamp_min(1e-30)).sqrt() for m in modes}
    return layer_err, group_err, weights


def _feature_bases(w_out: torch.Tensor, groups: list[list[int]], head_dim: int) -> list[torch.Tensor]:
    """Per-group bases for X_h = V_h R_h: shd.group_feature_bases (width k d instead of D, exact) where
    that halves the width or better; otherwise the plain rows W_O[h] (width D) and no eigendecomposition."""
    d_model = w_out.shape[-1]
    out = []
    for group in groups:
        if 2 * len(group) * head_dim <= d_model:
            out.extend(group_feature_bases(w_out, [group], head_dim))
        else:
            out.append(torch.stack([w_out[h * head_dim:(h + 1) * head_dim] for h in group]))  # [k, d, D]
    return out


class FeatureBases:
    """X_h = V_h W_O[h] through the reduced per-group bases (exact inner products, see shd.py), or V_h
    where the model's output projection cannot be found; cached per (layer, groups)."""

    def __init__(self, model: torch.nn.Module, layers: int, head_dim: int) -> None:
        try:
            self.w_out = {i: output_projection(model, i).detach().float() for i in range(layers)}
            self.features = "V W_O"
        except ShdError:
            self.w_out, self.features = {}, "V"
        self.head_dim = head_dim
        self.cache: dict[tuple, list[torch.Tensor]] = {}

    def get(self, layer: int, groups: list[list[int]]) -> list[torch.Tensor] | None:
        if layer not in self.w_out:
            return None
        key = (layer, tuple(tuple(g) for g in groups))
        if key not in self.cache:
            self.cache[key] = _feature_bases(self.w_out[layer], groups, self.head_dim)
        return self.cache[key]


@dataclass
class Measurements:
    """What one pass over the batches gathered: per-layer accumulators and the plotted sample."""

    acc: list[_LayerAccumulator]
    contiguous_err: list[list[torch.Tensor]]  # per layer: [B] lsq errors of the contiguous groups
    seen: int  # samples measured
    sample_maps: list[torch.Tensor]  # per layer [H, n, n] of the plotted sample
    sample_ids: torch.Tensor | None  # its tokens (text)
    features: str


@torch.no_grad()
def inspect_heads(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    target_heads: int | None = None,
    tolerance: float = 0.3,
    grouper: Grouper | None = None,
    grouping: str = "balanced",
    sample_index: int = 0,
    device: torch.device | str = "cpu",
    tokenizer=None,
    meta: dict | None = None,
    compare_contiguous: bool = False,
) -> HeadsReport:
    """Run `model` (capture enabled here) over `batches` and measure every layer's heads.

    batches: [{"input_ids": [B, N], "attention_mask": [B, N]}, ...], or image batches
    [{"pixel_values": [B, C, H, W]}, ...] (no padding: every query row counts, CLS included).
    grouper(layer, K) gives the K head groups of a layer (default: balanced, or `grouping` = pairs).
    compare_contiguous: also measure the contiguous groups at the target K (LayerStats.contiguous_error).
    meta: descriptive fields of the report (model, folder, data, seq_len, task).
    """
    shape = model_shape(model.config)
    target = target_heads or default_heads(shape.heads)
    if not 1 <= target <= shape.heads:
        raise ShdError(f"--heads-to: {target} is outside 1..{shape.heads} "
                       f"(the model has {shape.heads} heads per layer)")
    grouper = grouper or fixed_grouper(shape.heads, grouping)
    enable_capture(model)
    model.eval().to(device)
    measured = measure_heads(model, batches, shape, target, grouper, sample_index, device, compare_contiguous)
    layer_stats = summarise_layers(measured, shape.heads, tolerance, compare_contiguous)
    return heads_report(measured, layer_stats, model, shape, target, tolerance, grouping, sample_index, tokenizer,
                        meta or {})


def measure_heads(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], shape, target: int,
                  grouper: Grouper, sample_index: int, device, compare_contiguous: bool) -> Measurements:
    """Measure phase: every batch through the model; per layer, the heads' pairwise JS and the squeeze
    errors at every K (lsq) and at the target K (every alpha mode, with weights)."""
    heads, n_layers = shape.heads, shape.layers
    bases = FeatureBases(model, n_layers, shape.head_dim)
    contiguous = group_heads(heads, target, "balanced")
    out = Measurements([_LayerAccumulator(heads, target, grouper(i, target)) for i in range(n_layers)],
                       [[] for _ in range(n_layers)], 0, [], None, bases.features)
    recorder = capture.AttentionRecorder(set(range(n_layers)), keep_values=True)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        row_mask = batch["attention_mask"].bool() if "attention_mask" in batch else None  # None: images
        bsz = len(next(iter(batch.values())))
        with recorder.active():
            model(**batch)
            records = dict(recorder.records)
        if len(records) != n_layers:
            raise ShdError(f"model: captured {len(records)} of {n_layers} attention layers; this model family "
                           "does not route attention through transformers' AttentionInterface")
        local = sample_index - out.seen if out.seen <= sample_index < out.seen + bsz else None
        if local is not None:
            length = None if row_mask is None else int(row_mask[local].sum())  # None: the whole image
            if "input_ids" in batch:
                out.sample_ids = batch["input_ids"][local, :length].cpu()
        for i in range(n_layers):
            rec = records[i]
            maps = attention_maps(rec.query, rec.keys_per_head(), rec.scaling, rec.allowed_rows(0, rec.query.shape[2]),
                                  softcap=rec.softcap)
            maps = maps.float()  # [B, H, N, M]
            a = out.acc[i]
            js, rows = pairwise_js(maps, row_mask)
            a.js += js
            a.rows += rows
            if local is not None:
                out.sample_maps.append(maps[local, :, :length, :length].cpu())
            for k in range(1, heads + 1):
                groups = a.target_groups if k == target else grouper(i, k)
                modes = MODES if k == target else ("lsq",)
                feats = None if all(len(g) == 1 for g in groups) else group_features(rec, groups, bases.get(i, groups))
                layer_err, group_err, weights = _group_errors(maps, feats, groups, modes, row_mask, exact=k == target)
                a.sweep.setdefault(k, []).append(layer_err["lsq"])
                if k == target:
                    for m in MODES:
                        a.errors[m].append(layer_err[m])
                        a.group_errors[m].append(group_err[m])
                    for j, w in enumerate(weights):
                        a.weights[j].append(w)
            if compare_contiguous and target < heads:
                feats = group_features(rec, contiguous, bases.get(i, contiguous))
                out.contiguous_err[i].append(_group_errors(maps, feats, contiguous, ("lsq",), row_mask)[0]["lsq"])
        out.seen += bsz
    if out.seen == 0:
        raise ShdError("data: no text samples to run the model on; give a file with some text")
    return out


def summarise_layers(measured: Measurements, heads: int, tolerance: float,
                     compare_contiguous: bool) -> list[LayerStats]:
    """Summarise phase: per layer, redundancy, mean errors, the suggested head count and group weights."""
    layer_stats = []
    for i, a in enumerate(measured.acc):
        js = a.js / max(a.rows, 1.0)
        error = {m: float(torch.cat(a.errors[m]).mean()) for m in MODES}
        by_k = {k: float(torch.cat(v).mean()) for k, v in sorted(a.sweep.items())}
        suggested = next(k for k, e in by_k.items() if e <= tolerance or k == heads)
        groups = []
        g_err = {m: torch.cat(a.group_errors[m]).mean(0) for m in MODES}
        for j, (g, ws) in enumerate(zip(a.target_groups, a.weights)):
            w = torch.cat(ws).double()
            groups.append(GroupStats(
                heads=list(g), weight_mean=w.mean(0).tolist(), weight_std=w.std(0, unbiased=False).tolist(),
                error={m: float(g_err[m][j]) for m in MODES}, alpha=w[:, 0].tolist(),
            ))
        off = ~torch.eye(heads, dtype=torch.bool)
        contiguous = measured.contiguous_err[i]
        layer_stats.append(LayerStats(
            layer=i, redundancy=redundancy_score(js), mean_js=float(js[off].mean()) if heads > 1 else 0.0,
            js=js.tolist(), groups=groups, error=error, error_by_heads=by_k, suggested_heads=suggested,
            contiguous_error=(None if not compare_contiguous else
                              float(torch.cat(contiguous).mean()) if contiguous else 0.0),
        ))
    return layer_stats


def heads_report(measured: Measurements, layer_stats: list[LayerStats], model: torch.nn.Module, shape, target: int,
                 tolerance: float, grouping: str, sample_index: int, tokenizer, meta: dict) -> HeadsReport:
    """Report phase: the HeadsReport (tables, JSON and plots read it)."""
    tokens = []
    if measured.sample_ids is not None and tokenizer is not None:
        tokens = [_token_label(tokenizer, t) for t in measured.sample_ids.tolist()]
    return HeadsReport(
        model=meta.get("model", type(model).__name__), folder=str(meta.get("folder", "")),
        model_type=shape.model_type, task=meta.get("task", ""), layers=shape.layers, heads=shape.heads,
        kv_heads=shape.kv_heads, data=meta.get("data", ""), samples=measured.seen, rows=int(measured.acc[0].rows),
        seq_len=int(meta.get("seq_len", 0)), target_heads=target, tolerance=tolerance,
        grouping=meta.get("grouping", grouping), features=measured.features, layer_stats=layer_stats,
        sample_index=sample_index, sample_tokens=tokens,
        sample_maps=torch.stack(measured.sample_maps) if measured.sample_maps else None,
    )


def _token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "\\n")
    return text if text.strip() else repr(text)

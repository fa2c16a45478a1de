"""An independent float64 NumPy oracle of docs/design.md §2 (and of ``route``, §1.4), written
token by token (not shared with the package), used to check the JAX reference."""

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn


def quantize_rows(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1x128 quantization of a float64 [n, c] array, exactly as docs/design.md §2 (f32
    arithmetic)."""
    v32 = v.astype(np.float32)
    n, c = v32.shape
    blocks = v32.reshape(n, c // 128, 128)
    scale = np.maximum(np.abs(blocks).max(-1), np.float32(1e-4)) / np.float32(448)
    q = np.clip(blocks / scale[..., None], -448, 448).astype(E4M3)
    return q.reshape(n, c), scale.astype(np.float32)


def expand(scale: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.repeat(np.repeat(np.asarray(scale, np.float64), rows, -2), cols, -1)


def moe_f64(
    x, x_scale, topk_ids, topk_weights, w1, w1_scale, w2, w2_scale, *, requant=True, clamp=None
):
    """y[m] = Σ_k o_k for global weights (all experts), float64 throughout except requant."""
    xf = np.asarray(x).astype(np.float64) * expand(x_scale, 1, 128)
    w1f = np.asarray(w1).astype(np.float64) * expand(w1_scale, 128, 128)
    w2f = np.asarray(w2).astype(np.float64) * expand(w2_scale, 128, 128)
    num_experts, two_i, _ = w1f.shape
    inter = two_i // 2
    ids = np.asarray(topk_ids)
    tw = np.asarray(topk_weights, np.float64)
    y = np.zeros(xf.shape, np.float64)
    for m in range(xf.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[m, k])
            if not 0 <= e < num_experts:
                continue
            h = w1f[e] @ xf[m]
            g, u = h[:inter], h[inter:]
            if clamp is not None:
                g = np.minimum(g, clamp)
                u = np.clip(u, -clamp, clamp)
            a = g / (1.0 + np.exp(-g)) * u * tw[m, k]
            if requant:
                q, s = quantize_rows(a[None, :])
                a = q.astype(np.float64)[0] * np.repeat(s[0].astype(np.float64), 128)
            y[m] += w2f[e] @ a
    return y


def route_f64(hidden, router, topk, *, scoring, normalize, scaling, bias=None, groups=(1, None)):
    """Top-k routing in float64, row by row, as DeepSeek-V3's gate describes it: scores from the
    logits; the bias added to choose only; with ``groups = (num_groups, kept)`` each row keeps
    its ``kept`` best groups (a group's score: its best expert, or its best two summed with a
    bias) and chooses among their experts; weights are the chosen unbiased scores."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(router, np.float64)
    if scoring == "softmax":
        scores = np.exp(logits - logits.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    num_groups, kept = groups
    ids = []
    for row in scores:
        choice = row if bias is None else row + np.asarray(bias, np.float64)
        size = len(row) // num_groups
        allowed = np.ones(len(row), bool)
        if num_groups > 1:
            per_group = np.sort(choice.reshape(num_groups, size), axis=1)[:, ::-1]
            group_score = per_group[:, 0] if bias is None else per_group[:, :2].sum(1)
            best = np.argsort(-group_score, kind="stable")[:kept]
            allowed = np.isin(np.arange(len(row)) // size, best)
        order = [e for e in np.argsort(-choice, kind="stable") if allowed[e]]
        ids.append(order[:topk])
    ids = np.asarray(ids)
    weights = np.take_along_axis(scores, ids, 1)
    if normalize:
        weights /= weights.sum(1, keepdims=True)
    return ids, weights * scaling

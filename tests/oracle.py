"""An independent float64 NumPy oracle of docs/design.md §2, written token by token (not shared with
the package), used to check the JAX reference."""

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

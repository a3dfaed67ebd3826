"""Fits the float32 tanh of the CPU kernels (csrc/cpu/cells/activation.h: tanh_act).

tanh(x) ~ x P(x^2) / Q(x^2) on [0, CLAMP], P of degree 5 and Q of degree 3 in x^2, P(0) = Q(0) = 1 (so
tanh(x) = x for tiny x, exactly). Beyond CLAMP tanh(x) rounds to 1 in float32, and the kernel clamps its
input there. The fit minimises the largest relative error: linearised least squares weighted by
1 / (tanh(x) Q_previous(x^2)) (Sanathanan-Koerner), reweighted toward the largest errors (Lawson).

    python scripts/fit_tanh.py     # prints the coefficients for activation.h and the fit's error
"""
from __future__ import annotations

import numpy as np

CLAMP = 9.02          # tanh(9.02) = 1 - 2.9e-8 rounds to 1.0f
P_DEGREE, Q_DEGREE = 5, 3


def fit(p_degree: int = P_DEGREE, q_degree: int = Q_DEGREE, clamp: float = CLAMP, iterations: int = 300,
        nodes: int = 20000) -> tuple[np.ndarray, np.ndarray, float]:
    """(p, q, error): coefficients of P and Q in x^2, lowest first, and the largest relative error of
    x P(x^2) / Q(x^2) against tanh(x) on Chebyshev nodes of (0, clamp], in float64."""
    x = np.sqrt((np.cos(np.linspace(0.0, np.pi, nodes)) + 1.0) / 2.0) * clamp
    x = x[x > 1e-3]
    y = np.tanh(x)
    u = (x / clamp) ** 2  # the fit runs in a scaled variable; coefficients are rescaled at the end
    # x (1 + sum_k p_k u^k) - y (1 + sum_k q_k u^k) = 0, linear in the unknown p_k, q_k (k >= 1)
    design = np.hstack([np.stack([x * u ** k for k in range(1, p_degree + 1)], 1),
                        np.stack([-y * u ** k for k in range(1, q_degree + 1)], 1)])
    weights, q_previous = np.ones_like(x), np.ones_like(x)
    best = None
    for _ in range(iterations):
        scale = weights / (y * q_previous)
        solution = np.linalg.lstsq(design * scale[:, None], (y - x) * scale, rcond=None)[0]
        p = np.concatenate([[1.0], solution[:p_degree]])
        q = np.concatenate([[1.0], solution[p_degree:]])
        q_previous = np.polynomial.polynomial.polyval(u, q)
        error = np.abs(x * np.polynomial.polynomial.polyval(u, p) / q_previous / y - 1.0)
        if best is None or error.max() < best[2]:
            best = (p, q, float(error.max()))
        weights = weights * np.sqrt(error / error.max()) + 1e-30
        weights /= weights.max()
    p, q, error = best
    return p / clamp ** (2 * np.arange(p_degree + 1)), q / clamp ** (2 * np.arange(q_degree + 1)), error


def main() -> None:
    p, q, error = fit()
    print(f"// x P(x^2) / Q(x^2) on |x| <= {CLAMP}: largest relative error {error:.2g} (float64)")
    print("P:", ", ".join(f"{v:.9g}f" for v in p))
    print("Q:", ", ".join(f"{v:.9g}f" for v in q))


if __name__ == "__main__":
    main()

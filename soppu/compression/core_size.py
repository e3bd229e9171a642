"""How one user's r_U × r_V core is kept, and what it costs: the one rule that the fit's rank
choice, the stored form and the reports all count by.

Uᵀ D_i V has rank ≤ k (the LoRA rank), so when k·(r_U + r_V) < r_U·r_V the core is kept as an
r_U × k times k × r_V product ("factored"), else whole ("dense"); a diagonal core is r_U
numbers ("diag")."""

from __future__ import annotations


def core_form(k: int, r_u: int, r_v: int) -> str:
    """ "factored" or "dense" for a full core."""
    return "factored" if k * (r_u + r_v) < r_u * r_v else "dense"


def core_params(form: str, k: int, r_u: int, r_v: int) -> int:
    """Numbers stored for one core in `form` ("diag", "factored" or "dense")."""
    return {"diag": r_u, "factored": k * (r_u + r_v), "dense": r_u * r_v}[form]


def cheapest_core_params(k: int, r_u: int, r_v: int) -> int:
    """Numbers stored for one full core in the form `core_form` picks."""
    return core_params(core_form(k, r_u, r_v), k, r_u, r_v)

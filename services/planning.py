"""The plan provider of one request: the policy at the request's budget, and what to report about it."""

from __future__ import annotations

from typing import Any

from adaptive_kv.errors import InfeasibleBudget
from adaptive_kv.plan import Plan
from adaptive_kv.services.errors import EngineError


class RequestPlanner:
    """AttentionStats -> Plan for one request, remembering whether it fell back to the full cache.

    A budget the client asked for must be met (else EngineError, 400 with the minimum). The
    server's default budget cannot be met by short prompts (sinks + recent window stay in full
    precision), and refusing every short prompt would make the default unusable: those get the
    full plan, reported as such.
    """

    def __init__(self, name: str, policy: Any, budget: float, is_default: bool, chosen: bool) -> None:
        self.name, self.policy, self.budget, self.is_default, self.chosen = name, policy, budget, is_default, chosen
        self.fallback: str | None = None

    def __call__(self, stats: Any) -> Any:
        """The plan for this request's statistics."""
        try:
            return self.policy.plan(stats, self.budget)
        except InfeasibleBudget as exc:
            if not self.is_default:
                raise EngineError(str(exc), param="kv_budget", code="budget_infeasible") from exc
            self.fallback = f"default {exc}; kept the full cache"
            return Plan.full(stats.num_layers, stats.num_kv_heads, **self.policy.layout().keywords(), windows=stats.windows)
        except ValueError as exc:  # not the budget: this policy cannot plan for this model or request
            raise EngineError(f"policy {self.name!r} cannot plan this request: {exc}",
                              kind="invalid_request" if self.chosen else "internal",
                              param="kv_policy" if self.chosen else None, code="policy_failed") from exc

    def info(self, report: dict[str, Any], policy: str) -> dict[str, Any]:
        """The `kv_cache` fields from a cache report (after the plan was applied)."""
        fell_back = self.fallback is not None
        return {"full_bytes": report["full_bytes"], "bytes": report["bytes"], "ratio": report["ratio"],
                "policy": "full" if fell_back else policy, "budget": 1.0 if fell_back else self.budget,
                "plan": report["plan"], "note": self.fallback}

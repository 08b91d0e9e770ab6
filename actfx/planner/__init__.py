"""The memory planner: a width per op so a training step fits a byte budget with the least harm.

    plan = actfx.plan(model, x, budget="6GiB")      # or activation_budget=..., or gpu="t4", batch=256
    model = actfx.convert(model, plan=plan)
"""

from actfx.planner.choose import BudgetError
from actfx.planner.make import plan
from actfx.planner.plan import Plan

__all__ = ["BudgetError", "Plan", "plan"]

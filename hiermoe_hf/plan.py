"""``python -m hiermoe_hf.plan``: the planner's command line (implemented in ``hiermoe_hf.cost.planner``)."""

from hiermoe_hf.cost.planner import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m hiermoe_hf.calibrate``: fit the cost model's constants (``hiermoe_hf.cost.calibration``)."""

from hiermoe_hf.cost.calibration import main

if __name__ == "__main__":
    raise SystemExit(main())

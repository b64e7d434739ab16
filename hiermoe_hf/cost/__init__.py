"""The alpha-beta cost model: constants, row counts, ``dispatch="auto"``, calibration, the planner."""

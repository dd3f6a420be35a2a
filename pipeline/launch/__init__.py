"""Launchers: run a stage in-process (`local`) or on Ray Train (`ray`). Both call
`pipeline.stages.run_stage` with a `Reporter`; only `ray.py` imports ray."""

"""capacity: the capacity planner (`pdserve plan`) and the cluster simulator (`pdserve simulate`).

Torch-free and Ray-free: it drives the project's own router (``router``), scheduler rules
(``engine.scheduling_rules``), KV memory math (``engine.kv_memory``) and autoscaling policies
(``cluster.autoscaling``); only ``capacity.calibrate`` imports the engine (lazily) to time it.
See docs/capacity.md.
"""

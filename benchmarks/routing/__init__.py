"""The routing simulation behind `python -m benchmarks.routing_sim`: 10,000 fine-tunes routed over
engine replicas, one discrete-event model. Its assumptions are in benchmarks/routing_sim.py's docstring.

`costs` what each kind of work costs a replica (measured step times, the disk read) · `replica` one
engine's scheduling rules · `routers` the routing policies · `simulation` the workload and the event
loop · `sweep` the grid of configurations and the capacity they show · `report` markdown and plot.
"""

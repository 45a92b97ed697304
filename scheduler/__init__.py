"""Phase-splitting planner: cost model, tabu search, LP routing, simulator (imports no torch)."""

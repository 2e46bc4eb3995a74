"""Pure numerics (numpy/tensorly only): decompositions, quantizers, importance scores, solvers."""

"""Offline tools (no serving): the sample bank, replay evaluation with bootstrap intervals, compute-optimal policies
and the evidence-based policy table. Serving never imports this package; it may import serving-side modules."""

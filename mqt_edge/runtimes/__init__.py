"""mqt_edge.runtimes (filled in by later work)."""

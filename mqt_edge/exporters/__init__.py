"""mqt_edge.exporters (filled in by later work)."""

"""mqt_edge.profiles (filled in by later work)."""

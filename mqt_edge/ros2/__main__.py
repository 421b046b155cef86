"""`python -m mqt_edge.ros2 [OPTIONS] [--ros-args ...]`: the same as `mqt-edge ros2`, run through the
package's own entry point (`python -m mqt_edge ros2`), so that this folder never imports the CLI above it."""

import runpy
import sys

sys.argv = ["mqt-edge", "ros2", *sys.argv[1:]]
runpy.run_module("mqt_edge", run_name="__main__", alter_sys=True)

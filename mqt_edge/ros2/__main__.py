"""`python -m mqt_edge.ros2 [OPTIONS] [--ros-args ...]`: the same as `mqt-edge ros2`."""

import sys

from ..cli import main

sys.argv = ["mqt-edge", "ros2", *sys.argv[1:]]
main()

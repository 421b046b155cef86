"""Launch the mqt-edge node beside a camera driver: `ros2 launch examples/ros2/mqt_edge.launch.py`.

The node is started as a process (`mqt-edge ros2`), so no ROS package needs to be built; the
camera topic is remapped onto the node's `image`. Change the arguments on the command line:
    ros2 launch examples/ros2/mqt_edge.launch.py bundle:=/opt/bundles/mqt camera:=/camera/image_raw
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration


def generate_launch_description() -> LaunchDescription:
    bundle = LaunchConfiguration("bundle")
    camera = LaunchConfiguration("camera")
    query = LaunchConfiguration("query")
    rate = LaunchConfiguration("rate")
    return LaunchDescription([
        DeclareLaunchArgument("bundle", default_value="mqt-edge-bundle"),
        DeclareLaunchArgument("camera", default_value="/camera/image_raw"),
        DeclareLaunchArgument("query", default_value="Is the path ahead clear?", description="the standing query"),
        DeclareLaunchArgument("rate", default_value="1.0", description="standing query at most this often (Hz)"),
        ExecuteProcess(
            cmd=["mqt-edge", "ros2", "--bundle", bundle, "--tokens", "16", "--threads", "1",
                 "--ros-args", "-r", "__node:=mqt_edge", "-r", ["image:=", camera],
                 "-p", ["query:=", query], "-p", ["rate:=", rate]],
            output="screen",
        ),
    ])

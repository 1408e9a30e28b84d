"""Launch the fovea_vla graph on a robot.

    ros2 launch fovea_vla fovea_vla.launch.py config:=jetson_orin.yaml \
        camera_topic:=/camera/color/image_raw use_replay:=false rviz:=true

The processes come from fovea_vla.bringup.node_graph, the same description `fovea-vla launch` uses.
fovea_node and policy_node are managed (lifecycle) nodes: `autostart:=false` leaves them unconfigured
for a lifecycle manager (`ros2 lifecycle set /fovea_node configure`, nav2_lifecycle_manager).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from fovea_vla.bringup import LAUNCH_ARGUMENTS, node_graph, parameter_file_paths


def _nodes(context):
    values = {arg.name: LaunchConfiguration(arg.name).perform(context) for arg in LAUNCH_ARGUMENTS}
    actions = []
    for spec in node_graph(**values):
        parameters = [str(path) for path in parameter_file_paths(spec.parameter_files)]
        actions.append(
            Node(
                package=spec.package,
                executable=spec.executable,
                name=None if spec.node_names else spec.name,
                namespace=values["namespace"],
                parameters=[*parameters, spec.parameters] if spec.parameters else parameters,
                remappings=list(spec.remappings),
                arguments=list(spec.arguments),
                output="screen",
                emulate_tty=True,
            )
        )
    return actions


def generate_launch_description():
    arguments = [
        DeclareLaunchArgument(arg.name, default_value=arg.default, description=arg.description)
        for arg in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_nodes)])

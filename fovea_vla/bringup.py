"""The one description of the node graph.

Both ``launch/fovea_vla.launch.py`` (launch_ros, on robots) and ``fovea-vla launch`` (plain
subprocesses, where launch_ros is not installed) build their processes from :func:`node_graph`,
so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LAUNCH_ARGUMENTS",
    "PACKAGE",
    "LaunchArgument",
    "NodeSpec",
    "camera_topics",
    "config_dir",
    "config_files",
    "node_graph",
    "node_values",
    "parameter_file_paths",
    "resolve_package_path",
]

PACKAGE = "fovea_vla"
BASE_CONFIG = "fovea_vla.yaml"


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str


LAUNCH_ARGUMENTS = (
    LaunchArgument(
        "config",
        BASE_CONFIG,
        "Parameter file: a name in the package's config/ folder "
        "(fovea_vla.yaml, cpu.yaml, desktop_gpu.yaml, jetson_orin.yaml) or a path. Platform files are "
        "applied on top of fovea_vla.yaml.",
    ),
    LaunchArgument(
        "camera_topic",
        "image",
        "Raw camera image topic; `<topic>/compressed` and the sibling "
        "`camera_info` are derived from it as image_transport does.",
    ),
    LaunchArgument(
        "policy",
        "false",
        "Run the action head: fovea_node and policy_node in one process (vla_stack) instead of fovea_node "
        "alone. Needs policy_node's policy.checkpoint in the parameter file.",
    ),
    LaunchArgument("use_replay", "true", "Start camera_replay to publish the camera topics."),
    LaunchArgument(
        "sim",
        "false",
        "Start sim_bridge: the simulated tabletop task as robot and camera (use with policy:=true, "
        "config:=sim.yaml, use_replay:=false).",
    ),
    LaunchArgument(
        "captions",
        "true",
        "Start caption_node (its own process): event narration, or a vision-language model when "
        "caption_node's caption.model_path names one.",
    ),
    LaunchArgument("replay_source", "synthetic", "camera_replay source: synthetic, a video, an image folder or a bag."),
    LaunchArgument(
        "autostart",
        "true",
        "Configure and activate the managed nodes (fovea_node, policy_node) at startup; false = they wait "
        "unconfigured for a lifecycle manager (`<node>/change_state`). Sets their `autostart` parameter.",
    ),
    LaunchArgument("namespace", "", "Namespace for every node of the graph."),
    LaunchArgument("rviz", "false", "Start RViz2 with config/fovea_vla.rviz."),
)


@dataclass(frozen=True)
class NodeSpec:
    """One process of the graph.

    Attributes:
        package: ROS package of the executable.
        executable: console script (ament_python installs it in lib/<package>).
        name: node name.
        parameter_files: files in config/ (or absolute paths), applied in order.
        parameters: overrides applied after the files.
        remappings: (from, to) topic remappings.
        arguments: extra command-line arguments (before --ros-args).
        node_names: for a process that hosts several nodes (``vla_stack``): their names. Such a
            process is not renamed (``name`` only labels the process and its log), and
            overrides are given per node.
    """

    package: str
    executable: str
    name: str
    parameter_files: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()
    arguments: tuple[str, ...] = ()
    node_names: tuple[str, ...] = ()


def config_dir() -> Path:
    """config/ of a source checkout when running from one, else the installed package share."""
    source = Path(__file__).resolve().parents[1] / "config"
    if (source / BASE_CONFIG).is_file():
        return source
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory(PACKAGE)) / "config"


def resolve_package_path(path: str) -> str:
    """``package://<package>/<relative path>`` as a file path (the source checkout's folder for
    fovea_vla when running from one, else the package's share folder); other paths unchanged.

    >>> resolve_package_path("/tmp/policy")
    '/tmp/policy'
    """
    prefix = "package://"
    if not path.startswith(prefix):
        return path
    package, _, relative = path[len(prefix) :].partition("/")
    if package == PACKAGE:
        return str(config_dir().parent / relative)
    from ament_index_python.packages import get_package_share_directory

    return str(Path(get_package_share_directory(package)) / relative)


def config_files(config: str = BASE_CONFIG) -> tuple[str, ...]:
    """The parameter files a ``config`` launch argument means: fovea_vla.yaml, then the overlay.

    >>> config_files("cpu.yaml")
    ('fovea_vla.yaml', 'cpu.yaml')
    """
    return (BASE_CONFIG,) if config == BASE_CONFIG else (BASE_CONFIG, config)


def node_values(config: str, specs, node_name: str) -> dict[str, object]:
    """``{parameter: value}`` a node gets from :func:`config_files` (defaults where unset), as rcl resolves them."""
    from fovea_vla.nodes.params import values_from_files

    return values_from_files(specs, parameter_file_paths(config_files(config)), node_name)


def parameter_file_paths(files: tuple[str, ...]) -> list[Path]:
    """Absolute paths of parameter files named relative to config/."""
    base = config_dir()
    return [Path(f) if Path(f).is_absolute() else base / f for f in files]


def camera_topics(camera_topic: str) -> dict[str, str]:
    """The three camera topics for a raw image topic (``/cam/image_raw`` -> ``/cam/camera_info``)."""
    topic = camera_topic.rstrip("/") or "image"
    parent, _, _ = topic.rpartition("/")
    info = f"{parent}/camera_info" if parent else "camera_info"
    return {"image": topic, "image/compressed": f"{topic}/compressed", "camera_info": info}


def _truthy(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def node_graph(
    config: str = BASE_CONFIG,
    camera_topic: str = "image",
    use_replay: str | bool = True,
    replay_source: str = "synthetic",
    rviz: str | bool = False,
    policy: str | bool = False,
    sim: str | bool = False,
    captions: str | bool = True,
    autostart: str | bool = True,
    **_ignored,
) -> list[NodeSpec]:
    """Processes of the graph for the given launch arguments (same names as LAUNCH_ARGUMENTS)."""
    files = config_files(config)
    remap = tuple(camera_topics(camera_topic).items())
    # The managed nodes' `autostart` (both nodes of vla_stack take it).
    managed = {"autostart": _truthy(autostart)}
    graph = []
    if _truthy(sim):
        graph.append(NodeSpec(PACKAGE, "sim_bridge", "sim_bridge", files, {}, remap))
    if _truthy(use_replay):
        graph.append(NodeSpec(PACKAGE, "camera_replay", "camera_replay", files, {"source": replay_source}, remap))
    if _truthy(policy):
        graph.append(
            NodeSpec(PACKAGE, "vla_stack", "vla_stack", files, managed, remap, node_names=("fovea_node", "policy_node"))
        )
    else:
        graph.append(NodeSpec(PACKAGE, "fovea_node", "fovea_node", files, managed, remap))
    if _truthy(captions):
        graph.append(NodeSpec(PACKAGE, "caption_node", "caption_node", files, {}, remap))
    if _truthy(rviz):
        rviz_config = str(config_dir() / "fovea_vla.rviz")
        graph.append(NodeSpec("rviz2", "rviz2", "rviz2", arguments=("-d", rviz_config)))
    return graph

"""Static checks of the node graph, the launch file and the parameter files."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
import yaml

from fovea_vla.bringup import LAUNCH_ARGUMENTS, camera_topics, config_dir, node_graph, parameter_file_paths
from fovea_vla.launcher import GraphProcesses, command_for
from fovea_vla.nodes import fovea_node
from fovea_vla.nodes.catalog import NODE_PARAMS, default_parameter_file
from fovea_vla.nodes.params import format_table, values_from_files

REPO = Path(__file__).resolve().parents[2]


def console_scripts() -> set[str]:
    """Console script names declared in setup.py (read statically)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    scripts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "=" in node.value and ":" in node.value:
            scripts.add(node.value.split("=")[0].strip())
    return scripts


def all_graphs():
    configs = sorted(p.name for p in config_dir().glob("*.yaml"))
    for config, replay, rviz in itertools.product(configs, ("true", "false"), ("true", "false")):
        yield node_graph(config=config, use_replay=replay, rviz=rviz, camera_topic="/cam/color/image_raw")


def test_every_executable_is_a_console_script_and_every_parameter_file_exists():
    scripts = console_scripts()
    assert {"fovea_node", "camera_replay", "fovea-vla"} <= scripts
    for graph in all_graphs():
        for spec in graph:
            if spec.package == "fovea_vla":
                assert spec.executable in scripts, spec
            for path in parameter_file_paths(spec.parameter_files):
                assert path.is_file(), path
            for argument in spec.arguments:
                if argument.endswith(".rviz"):
                    assert Path(argument).is_file(), argument


def test_launch_file_builds_its_nodes_from_bringup():
    source = (REPO / "launch" / "fovea_vla.launch.py").read_text()
    tree = ast.parse(source)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "fovea_vla.bringup"
        for alias in node.names
    }
    assert {"LAUNCH_ARGUMENTS", "node_graph"} <= imported
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    # No executable or parameter file names hard-coded in the launch file's code.
    docstring = ast.get_docstring(tree, clean=False)
    literals = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value != docstring
    ]
    assert not [s for s in literals if s.endswith((".yaml", ".rviz")) or s in ("fovea_node", "camera_replay")]


def test_launch_arguments_match_node_graph_signature():
    names = {a.name for a in LAUNCH_ARGUMENTS}
    assert names == {
        "config",
        "camera_topic",
        "use_replay",
        "replay_source",
        "namespace",
        "rviz",
        "policy",
        "sim",
        "captions",
        "autostart",
    }
    node_graph(**{a.name: a.default for a in LAUNCH_ARGUMENTS})


@pytest.mark.parametrize("policy", ["true", "false"])
def test_autostart_reaches_the_managed_nodes_only(policy):
    for value, expected in (("true", True), ("false", False)):
        graph = node_graph(use_replay=True, policy=policy, captions=True, autostart=value)
        parameters = {spec.name: spec.parameters for spec in graph}
        managed = "vla_stack" if policy == "true" else "fovea_node"
        assert parameters[managed] == {"autostart": expected}
        assert "autostart" not in parameters["camera_replay"] and "autostart" not in parameters["caption_node"]
        argv = " ".join(command_for(next(s for s in graph if s.name == managed)))
        assert f"-p autostart:={value}" in argv


def test_captions_run_in_their_own_process_unless_turned_off():
    with_captions = node_graph(use_replay=False, policy="true")
    assert [spec.executable for spec in with_captions] == ["vla_stack", "caption_node"]
    assert with_captions[1].remappings == with_captions[0].remappings  # camera_info reaches it too
    assert [spec.executable for spec in node_graph(use_replay=False, policy="true", captions="false")] == ["vla_stack"]


def test_policy_runs_both_nodes_in_one_process_with_node_scoped_overrides(tmp_path):
    graph = node_graph(use_replay=False, policy="true", captions=False)
    assert [(spec.executable, spec.node_names) for spec in graph] == [("vla_stack", ("fovea_node", "policy_node"))]
    processes = GraphProcesses(
        graph, parameters={"policy_node": {"enable_actions": True}, "fovea_node": {"flow.grid": 2}}
    )
    files = processes._node_override_files(graph[0])
    argv = command_for(graph[0], "ns", extra_files=files)
    assert "__node:=vla_stack" not in " ".join(argv)  # each node keeps its own name
    params_files = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--params-file"]
    assert params_files[-1] == str(files[0])  # after the config files, so the overrides win
    sections = yaml.safe_load(files[0].read_text())
    assert sections == {
        "/**/policy_node": {"ros__parameters": {"enable_actions": True}},
        "/**/fovea_node": {"ros__parameters": {"flow": {"grid": 2}}},
    }
    processes.stop()
    assert not files[0].exists()


def test_camera_topic_derivation_follows_image_transport():
    assert camera_topics("/cam/color/image_raw") == {
        "image": "/cam/color/image_raw",
        "image/compressed": "/cam/color/image_raw/compressed",
        "camera_info": "/cam/color/camera_info",
    }
    assert camera_topics("image")["camera_info"] == "camera_info"


def test_platform_configs_are_layered_on_the_defaults():
    graph = node_graph(config="jetson_orin.yaml", use_replay=False)
    assert graph[0].parameter_files == ("fovea_vla.yaml", "jetson_orin.yaml")


def test_dev_launcher_command_line():
    spec = node_graph(use_replay=False, camera_topic="/cam/image_raw")[0]
    argv = command_for(spec, namespace="robot1", extra_parameters={"flow.backend": "dis", "flow.scale": 1.0})
    assert Path(argv[0]).name == "fovea_node"
    joined = " ".join(argv)
    assert "--ros-args -r __node:=fovea_node -r __ns:=/robot1" in joined
    assert "-p flow.backend:='dis'" in joined and "-p flow.scale:=1.0" in joined
    assert "-r image:=/cam/image_raw" in joined and "-r camera_info:=/cam/camera_info" in joined


@pytest.mark.parametrize("node", sorted(NODE_PARAMS))
def test_default_yaml_declares_exactly_the_node_parameters(node):
    specs = NODE_PARAMS[node]
    path = config_dir() / "fovea_vla.yaml"
    document = yaml.safe_load(path.read_text())
    assert f"/**/{node}" in document
    values = values_from_files(specs, [path], node)
    declared = {s.name: s.default for s in specs}
    assert set(values) == set(declared), set(values) ^ set(declared)
    assert values == declared


def test_default_yaml_is_generated_from_the_tables():
    assert (config_dir() / "fovea_vla.yaml").read_text() == default_parameter_file(), (
        "config/fovea_vla.yaml is out of date: regenerate with `fovea-vla params --format yaml > config/fovea_vla.yaml`"
    )


@pytest.mark.parametrize("config", ["cpu.yaml", "desktop_gpu.yaml", "jetson_orin.yaml"])
def test_platform_yaml_values_are_valid(config):
    for node, specs in NODE_PARAMS.items():
        values = values_from_files(specs, [config_dir() / "fovea_vla.yaml", config_dir() / config], node)
        names = {s.name for s in specs}
        assert set(values) == names, f"{config}: unknown parameters {set(values) - names}"
        for spec in specs:
            assert type(values[spec.name]) is type(spec.default), (config, spec.name)
            assert spec.check(values[spec.name]) is None
    fovea_node.pipeline_config(values_from_files(fovea_node.PARAMS, [config_dir() / config], "fovea_node"))


@pytest.mark.parametrize("node", sorted(NODE_PARAMS))
def test_readme_parameter_tables_match_declarations(node):
    readme = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- params:{node}:begin -->\n(.*?)\n<!-- params:{node}:end -->", readme, re.S)
    assert match, f"README.md has no parameter table for {node}"
    assert match.group(1).strip() == format_table(NODE_PARAMS[node]).strip()

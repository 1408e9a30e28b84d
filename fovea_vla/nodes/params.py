"""Declaring ROS parameters from one table per node, with descriptors.

Each node lists its parameters as :class:`ParamSpec` rows (name, default, description, range or
choices). The same rows feed the README tables (a test compares them), ``--help``-style docs and
the declarations, so a parameter cannot exist in one place and not the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterException

__all__ = ["ParamSpec", "declare_all", "format_table"]

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter.

    Attributes:
        name: dotted parameter name (``flow.backend``).
        default: default value; its Python type is the parameter's type.
        description: one line for ``ros2 param describe`` and the README.
        range: inclusive (min, max) for numbers.
        choices: allowed values for strings.
        read_only: true when a change needs a restart.
    """

    name: str
    default: bool | int | float | str
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    read_only: bool = True

    @property
    def type_name(self) -> str:
        return type(self.default).__name__

    def descriptor(self) -> ParameterDescriptor:
        text = self.description
        if self.choices:
            text += f" One of: {', '.join(self.choices)}."
        descriptor = ParameterDescriptor(
            name=self.name,
            type=_TYPES[type(self.default)],
            description=text,
            read_only=self.read_only,
            # Doubles accept integers written in YAML (`scale: 1`); declare_all converts them.
            dynamic_typing=isinstance(self.default, float),
        )
        if self.range is not None and isinstance(self.default, float):
            descriptor.floating_point_range = [
                FloatingPointRange(from_value=float(self.range[0]), to_value=float(self.range[1]), step=0.0)
            ]
        elif self.range is not None and isinstance(self.default, int) and not isinstance(self.default, bool):
            descriptor.integer_range = [
                IntegerRange(from_value=int(self.range[0]), to_value=int(self.range[1]), step=1)
            ]
        if self.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(self.choices)
        return descriptor

    def check(self, value) -> str | None:
        """A reason the value is refused, or None when it is acceptable."""
        if self.choices and value not in self.choices:
            return f"{self.name}={value!r}: must be one of {', '.join(self.choices)}"
        if self.range is not None and not self.range[0] <= value <= self.range[1]:
            return f"{self.name}={value!r}: must be in [{self.range[0]}, {self.range[1]}]"
        return None


def declare_all(node, specs: Sequence[ParamSpec]) -> dict[str, object]:
    """Declare every parameter on ``node`` and return ``{name: value}``.

    Raises:
        ValueError: a value of the wrong type, or out of its range or choices, naming the parameter.
    """
    values = {}
    for spec in specs:
        try:
            value = node.declare_parameter(spec.name, spec.default, spec.descriptor()).value
        except ParameterException as exc:
            raise ValueError(f"parameter {spec.name}: {exc}") from exc
        if isinstance(spec.default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(spec.default):
            raise ValueError(
                f"{spec.name}={value!r}: expected {type(spec.default).__name__}, got {type(value).__name__}"
            )
        problem = spec.check(value)
        if problem:
            raise ValueError(problem)
        values[spec.name] = value
    return values


def format_table(specs: Sequence[ParamSpec]) -> str:
    """Markdown table of parameters (as in the README)."""
    lines = ["| Parameter | Type | Default | Description |", "|---|---|---|---|"]
    for spec in specs:
        default = f'"{spec.default}"' if isinstance(spec.default, str) else str(spec.default).lower()
        text = spec.description
        if spec.choices:
            text += f" One of: {', '.join(f'`{c}`' for c in spec.choices)}."
        if spec.range is not None:
            text += f" Range: [{spec.range[0]}, {spec.range[1]}]."
        lines.append(f"| `{spec.name}` | {spec.type_name} | {default} | {text} |")
    return "\n".join(lines)


def values_from_files(specs: Sequence[ParamSpec], paths: Sequence, node_name: str) -> dict[str, object]:
    """Parameter values a node would get from ROS parameter files (defaults where unset).

    Reads the ``<node>`` / ``/**/<node>`` / ``/**`` sections' ``ros__parameters`` and flattens
    nested keys with dots, as rcl does. Later files override earlier ones.
    """
    import yaml

    values = {spec.name: spec.default for spec in specs}
    for path in paths:
        with open(path) as stream:
            document = yaml.safe_load(stream) or {}
        for key, section in document.items():
            if key.rsplit("/", 1)[-1] not in (node_name, "**") or not isinstance(section, dict):
                continue
            stack = [("", section.get("ros__parameters", {}))]
            while stack:
                prefix, mapping = stack.pop()
                for name, value in mapping.items():
                    full = f"{prefix}{name}"
                    if isinstance(value, dict):
                        stack.append((f"{full}.", value))
                    else:
                        values[full] = value
    return values


def _yaml_scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def format_yaml(node_name: str, specs: Sequence[ParamSpec], width: int = 100) -> str:
    """A commented ROS parameter file section with every parameter at its default."""
    import textwrap

    lines = [f"/**/{node_name}:", "  ros__parameters:"]
    groups: dict[str, list[tuple[str, ParamSpec]]] = {}
    for spec in specs:
        group, _, leaf = spec.name.rpartition(".")
        groups.setdefault(group, []).append((leaf, spec))
    for group, members in groups.items():
        indent = "    "
        if group:
            lines.append(f"    {group}:")
            indent = "      "
        for leaf, spec in members:
            text = spec.description.replace("`", "")
            if spec.choices:
                text += f" One of: {', '.join(spec.choices)}."
            if spec.range is not None:
                text += f" Range [{spec.range[0]}, {spec.range[1]}]."
            lines += [f"{indent}# {line}" for line in textwrap.wrap(text, width - len(indent) - 2)]
            lines.append(f"{indent}{leaf}: {_yaml_scalar(spec.default)}")
    return "\n".join(lines)

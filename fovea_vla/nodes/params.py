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

__all__ = [
    "ConfigError",
    "ParamSpec",
    "declare_all",
    "declare_parameters",
    "format_table",
    "read_parameters",
    "validate_changes",
]

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
_ARRAY_TYPES = {
    int: ParameterType.PARAMETER_INTEGER_ARRAY,
    float: ParameterType.PARAMETER_DOUBLE_ARRAY,
    str: ParameterType.PARAMETER_STRING_ARRAY,
}


class ConfigError(ValueError):
    """A parameter value was refused; the message names the parameter."""


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter.

    Attributes:
        name: dotted parameter name (``flow.backend``).
        default: default value; its Python type is the parameter's type. A non-empty tuple of
            ints, floats or strings is an array of that type (of that fixed length unless
            ``variable_length``).
        description: one line for ``ros2 param describe`` and the README.
        range: inclusive (min, max) for numbers (each element of an array).
        choices: allowed values for strings.
        read_only: true when a change needs a restart.
        variable_length: an array of any length >= 1 (the node checks it against related
            parameters).
    """

    name: str
    default: bool | int | float | str | tuple
    description: str
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None
    read_only: bool = True
    variable_length: bool = False

    @property
    def element_type(self) -> type:
        """Python type of the value, or of each element of an array."""
        return type(self.default[0]) if isinstance(self.default, tuple) else type(self.default)

    @property
    def type_name(self) -> str:
        name = self.element_type.__name__
        if not isinstance(self.default, tuple):
            return name
        return f"{name}[]" if self.variable_length else f"{name}[{len(self.default)}]"

    def descriptor(self) -> ParameterDescriptor:
        text = self.description
        if self.choices:
            text += f" One of: {', '.join(self.choices)}."
        descriptor = ParameterDescriptor(
            name=self.name,
            type=(_ARRAY_TYPES if isinstance(self.default, tuple) else _TYPES)[self.element_type],
            description=text,
            read_only=self.read_only,
            # Doubles accept integers written in YAML (`scale: 1`); declare_all converts them.
            dynamic_typing=self.element_type is float,
        )
        # ROS descriptor ranges apply to scalars only; check() bounds every element of an array.
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
        values = value if isinstance(self.default, tuple) else (value,)
        if isinstance(self.default, tuple) and self.variable_length and not value:
            return f"{self.name}=[]: must have at least one element"
        if isinstance(self.default, tuple) and not self.variable_length and len(value) != len(self.default):
            return f"{self.name}={list(value)!r}: must have {len(self.default)} elements"
        if self.range is not None and not all(self.range[0] <= v <= self.range[1] for v in values):
            return f"{self.name}={value!r}: must be in [{self.range[0]}, {self.range[1]}]"
        return None

    def coerce(self, value):
        """A declared value in the spec's Python type (ints widened to floats), or ValueError."""
        if isinstance(self.default, tuple):
            if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
                raise ValueError(f"{self.name}={value!r}: expected a list of {self.element_type.__name__}")
            return tuple(self._coerce_scalar(v) for v in value)
        return self._coerce_scalar(value)

    def _coerce_scalar(self, value):
        kind = self.element_type
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not kind:
            raise ValueError(f"{self.name}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
        return value


def declare_all(node, specs: Sequence[ParamSpec]) -> dict[str, object]:
    """Declare every parameter on ``node`` and return ``{name: value}``.

    Raises:
        ValueError: a value of the wrong type, or out of its range or choices, naming the parameter.
    """
    return read_parameters(node, specs, declare_parameters(node, specs))


def declare_parameters(node, specs: Sequence[ParamSpec]) -> list[str]:
    """Declare every parameter on ``node`` with its descriptor, refusing nothing: where rclpy refuses
    a given value (wrong type, out of range) the parameter is declared at its default instead.

    Returns:
        The reasons rclpy refused given values, each naming the parameter; a managed node reports
        them when it is configured (:func:`read_parameters`).
    """
    refused = []
    for spec in specs:
        default = list(spec.default) if isinstance(spec.default, tuple) else spec.default
        try:
            node.declare_parameter(spec.name, default, spec.descriptor())
        except ParameterException as exc:
            refused.append(f"parameter {spec.name}: {exc}")
            node.declare_parameter(spec.name, default, spec.descriptor(), ignore_override=True)
    return refused


def read_parameters(node, specs: Sequence[ParamSpec], refused: Sequence[str] = ()) -> dict[str, object]:
    """``{name: value}`` of the declared parameters, as they are now, each checked against its spec.

    Args:
        refused: reasons from :func:`declare_parameters`; the first is raised.

    Raises:
        ValueError: a refused value (wrong type, out of range or choices), naming the parameter.
    """
    if refused:
        raise ValueError(refused[0])
    values = {}
    for spec in specs:
        value = spec.coerce(node.get_parameter(spec.name).value)
        problem = spec.check(value)
        if problem:
            raise ValueError(problem)
        values[spec.name] = value
    return values


def format_table(specs: Sequence[ParamSpec]) -> str:
    """Markdown table of parameters (as in the README)."""
    lines = ["| Parameter | Type | Default | Description |", "|---|---|---|---|"]
    for spec in specs:
        default = f'"{spec.default}"' if isinstance(spec.default, str) else _yaml_scalar(spec.default)
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
                        values[full] = tuple(value) if isinstance(value, list) else value
    return values


def _yaml_scalar(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
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


def validate_changes(specs: Sequence[ParamSpec], parameters) -> tuple[dict[str, object], str | None]:
    """Run-time parameter changes checked like startup values: ``({name: value}, None)``, or
    ``({}, reason)`` naming the first refused parameter. Parameters not in ``specs`` (rclpy's own,
    such as ``use_sim_time``) are left to rclpy."""
    by_name = {spec.name: spec for spec in specs}
    changes = {}
    for parameter in parameters:
        spec = by_name.get(parameter.name)
        if spec is None:
            continue
        if spec.read_only:
            return {}, f"{spec.name} is read-only: changing it needs a restart"
        try:
            value = spec.coerce(parameter.value)
        except ValueError as exc:
            return {}, str(exc)
        problem = spec.check(value)
        if problem:
            return {}, problem
        changes[spec.name] = value
    return changes, None

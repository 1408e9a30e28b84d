"""fovea_vla: real-time vision-language-action control on the robot's own GPU."""

__version__ = "0.1.0"

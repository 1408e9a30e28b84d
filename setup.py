from glob import glob

from setuptools import find_packages, setup

PACKAGE = "fovea_vla"

setup(
    name=PACKAGE,
    version="0.1.0",
    description="Real-time VLA control on the robot's GPU: foveated tokens driven by optical flow",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")),
        *((f"share/{PACKAGE}/{folder}", glob(f"{folder}/*")) for folder in sorted(glob("policies/*"))),
    ],
    # ROS dependencies come from package.xml (rosdep) or requirements/ros.txt (PyPI wheels).
    install_requires=["setuptools"],
    zip_safe=True,
    entry_points={
        "console_scripts": [
            "fovea_node = fovea_vla.nodes.fovea_node:main",
            "camera_replay = fovea_vla.nodes.camera_replay:main",
            "vla_stack = fovea_vla.nodes.vla_stack:main",
            "sim_bridge = fovea_vla.nodes.sim_bridge:main",
            "caption_node = fovea_vla.nodes.caption_node:main",
            "fovea-vla = fovea_vla.cli:main",
        ],
    },
)

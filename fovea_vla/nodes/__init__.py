"""Thin rclpy adapters: ROS parameters -> core configs, messages <-> core types."""

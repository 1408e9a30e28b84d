"""ROS-free algorithms of fovea_vla. Nothing below this package imports rclpy or messages."""

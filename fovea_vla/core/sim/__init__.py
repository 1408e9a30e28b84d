"""Simulated tabletop manipulation (PyBullet) and its scripted expert, for data collection and closed-loop tests."""

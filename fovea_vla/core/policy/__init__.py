"""Action head, chunk execution and safety: from foveated tokens to robot commands."""

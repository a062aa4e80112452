"""Studies of what users get: the utility study (every noise placement beside the baselines) and the late joiner."""

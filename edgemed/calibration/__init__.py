"""Calibration: the built-in material (builtin), calibration sets users build (sets), samples a
step draws from a set (samples) and feeds for exported graphs (feeds)."""

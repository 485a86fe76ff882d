"""Package data: the built-in calibration prompts (prompts.txt)."""

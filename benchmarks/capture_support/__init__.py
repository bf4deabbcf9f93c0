"""What benchmarks/capture_scale.py needs besides its measurements: the synthetic capture and the step probe."""

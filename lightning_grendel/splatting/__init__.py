"""3D Gaussian Splatting maths with no Lightning in it: cameras, Gaussians, SH, projection, rasterization."""

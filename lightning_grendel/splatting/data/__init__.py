"""3DGS scenes: COLMAP and NeRF-synthetic readers, the procedural demo scene, and the Lightning data module."""

"""Datasets for the Gaussian-splatting recipes: COLMAP, NeRF-synthetic (Blender), a procedural demo scene,
and the LightningDataModule that serves them. Import the submodules directly; nothing heavy is loaded here."""

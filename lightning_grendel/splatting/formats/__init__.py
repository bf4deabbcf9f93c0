"""Gaussian scene files other tools read and write: standard and compressed PLY, SPZ and ``.splat``.

:func:`.io.read_gaussians` returns the raw 3DGS parameters every reader shares (:mod:`.common`) and
:func:`.io.write_gaussians` writes any of them atomically. The standard PLY (:mod:`..ply`) is lossless;
the others quantise (their tolerances are in the module docstrings and docs/3dgs.md, "Exporting").
"""

"""LightningModules for the Lorentz networks (the only part of ``hyperbolic`` that imports Lightning)."""

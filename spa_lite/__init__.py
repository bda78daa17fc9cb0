"""spa-lite: Spread Preference Annotation (Kim et al., ICLR 2025) on one GPU, with one copy of the base weights."""

__version__ = "0.1.0"

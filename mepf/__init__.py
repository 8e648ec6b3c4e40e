"""mepf: differentially private image generation by DP-MEPF (Harder et al., TMLR 2023)."""
__version__ = "0.1.0"

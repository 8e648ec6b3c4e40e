"""Stage 1 (data owner): data sources, the feature map, and the private release."""

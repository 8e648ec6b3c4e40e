"""Stage 3: FID (pytorch-fid), downstream classifier accuracy and the embedding distance of generated images
against real held-out ones, with a report (report.json, report.md, sample grids and curves)."""

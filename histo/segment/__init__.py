"""From pixels to nuclei: tissue mask, tile grid, the nucleus model and its per-tile Dask task, nucleus
tables and features, learned nucleus classes, and the label pyramid.
"""

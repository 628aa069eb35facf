"""Running slides: one slide end to end (``pipeline``), many slides (``batch``), the Dask cluster, progress
bars and provenance.
"""

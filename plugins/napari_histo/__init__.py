"""napari plugin for histo: slides and result bundles as overlays in µm.

This package never imports TensorFlow: analysis runs in Dask worker processes.
"""

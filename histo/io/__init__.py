"""Reading slides and writing bundles: whole-slide images at any µm/px (``slide``, ``tiff_tiles``) and the result
bundle's folder, lock and completion marker (``bundle``).
"""

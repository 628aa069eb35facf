"""What a user opens: the bundle's tables and GeoJSON, figures and report, reviewed regions, the cohort
report and the SpatialData export.
"""

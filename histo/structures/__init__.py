"""From cells to what pathologists grade: cell types, follicles / germinal centres / aggregates / lining,
and the per-region metric table.
"""

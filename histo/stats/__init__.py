"""Statistics: neighbourhood statistics per slide and region, and the cohort's endpoints and tests."""

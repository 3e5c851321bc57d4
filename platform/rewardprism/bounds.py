"""Bounds every layer enforces alike (the API, the store, scoring), kept in one module without dependencies."""
from __future__ import annotations

# Largest |weight| or |bias| a served profile may hold: with backbone features of ordinary size every score
# stays far from float64 overflow. The API and the store refuse larger values; a stored profile beyond it is
# not used.
MAX_ABS_WEIGHT = 1e6

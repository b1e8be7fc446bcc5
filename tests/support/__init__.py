"""Test helpers shared by the unit, integration and end-to-end tests (on `pythonpath` via pyproject)."""

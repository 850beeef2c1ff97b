"""Target programs for the ProcessTracker tests (compiled by the tests themselves)."""

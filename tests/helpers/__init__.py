"""Helpers shared by test modules, grouped by topic (plain functions and constants, no fixtures: those
live in a conftest.py). Test modules import from here, never from one another."""

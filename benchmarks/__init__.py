"""Benchmarks: scripts that measure the platform's targets, print a table and write results/*.json.

A package only so that the import contracts (pyproject [tool.importlinter]) see it as the top
layer.
"""

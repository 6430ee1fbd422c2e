"""Meshes, the logical-axis rules table, and placing host data on a mesh."""

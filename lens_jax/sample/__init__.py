"""Sampling: sigma schedules, the Euler flow sampler with CFG, presets, the generate CLI."""

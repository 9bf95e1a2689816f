"""Evaluators that read a work directory and write JSON + PNG next to it."""

"""Readers for model files on disk: each turns a file into a `Checkpoint`."""

"""Adapters: one file per model family. Installed as `tokenreduce.adapters`.

Adapters recognise a model, publish its sites, and install stages with hooks. They never
contain an algorithm; the algorithms live in `tokenreduce.reducers`.
"""

"""Recipes that combine the components: the main job, sweeps, the category and agent experiments, interpolation.

Each takes config objects (copied with `dataclasses.replace`, never changed in place) and writes its
results into a folder of its own; the command line only parses arguments and calls them.
"""

"""The multi-label evaluator: its networks and files, the accuracy metric, training one, the one shipped
for the built-in set, choosing which one scores a set, and sampling + scoring in one call."""

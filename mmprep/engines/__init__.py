"""Alternative execution engines for `mmprep encode` (the default local engine lives in mmprep.pipeline).

Each engine is imported only when chosen, so the core install never imports its dependencies.
"""

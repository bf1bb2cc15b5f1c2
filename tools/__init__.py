"""Developer and test tools for udpmux (not installed with the package)."""

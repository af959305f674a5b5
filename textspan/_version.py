"""The package version, in a module of its own (so that modules need not import the package to read it)."""
__version__ = "0.1.0"

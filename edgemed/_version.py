"""The package version, in a module of its own so every layer can read it without importing the
package's public API (edgemed/__init__.py)."""
__version__ = "0.1.0"

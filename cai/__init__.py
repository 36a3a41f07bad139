"""cai: Constitutional AI and RLAIF, from a versioned constitution to a harmless model."""

__version__ = "0.1.0"

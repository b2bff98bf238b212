"""Defenses: one module per method; `none` lives in securetl.interfaces (the base class is the plain probe)."""

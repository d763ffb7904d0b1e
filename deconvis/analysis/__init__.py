"""Zeiler & Fergus Section 4 analyses."""

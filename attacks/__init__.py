"""Attacks: data/ poisons the downstream set (Threat-2), encoder/ the pre-trained encoder (Threat-1)."""

"""Destinations, rules and durable forwarding (issue 5)."""

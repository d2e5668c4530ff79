"""Research tools outside the product (research/README.md)."""

"""Task adapters that put heads on the Florence encoders."""

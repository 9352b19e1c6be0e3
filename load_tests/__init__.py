"""Load and soak tests that drive a real `star-serve serve` process over HTTP (see README.md here)."""

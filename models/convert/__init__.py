"""Converters that turn weights shipped in other formats into Hugging Face models."""

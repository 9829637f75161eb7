"""pneumo: pneumonia detection on pediatric chest X-rays."""

__version__ = "0.1.0"

"""polyfast: fast, faithful PolyAlign training (Bucket-Aware SFT and HDPO)."""

__version__ = "0.1.0"

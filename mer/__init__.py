"""mer: the Micro-Expert-Router. Streams Mixture-of-Experts expert weights from SSD into a RAM cache."""

__version__ = "0.1.0"

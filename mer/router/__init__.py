"""The router's parts: clients of the I/O worker and the compute workers, and the benchmark job."""

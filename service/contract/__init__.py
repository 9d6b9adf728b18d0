"""The contract between training and serving (DESIGN.md §5): torch-free, written by training, read by the service."""

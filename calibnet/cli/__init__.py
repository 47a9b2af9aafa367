"""Console scripts: each module parses arguments, calls one library function and prints."""

"""Vector stores behind one protocol (``VectorStore``): the embedded default and, later, Weaviate."""

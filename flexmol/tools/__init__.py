"""The user tools over any exported checkpoint of either recipe: embeddings, explanations, retrieval."""

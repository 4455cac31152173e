"""Reading and writing weights, and translating foreign checkpoint formats at the edge."""

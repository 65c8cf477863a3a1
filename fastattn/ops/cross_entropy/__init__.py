"""Full-catalog cross-entropy (hard and soft targets) and chunked top-k, never N×V."""

"""Data backends (pytorch, synthetic, dali-cpu, dali-gpu) behind one registry."""

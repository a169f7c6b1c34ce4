"""Orthogonal transforms (Hadamard rotations) used by the rotation algorithms in calib/."""

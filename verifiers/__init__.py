"""Verification: Merkle trees and, per stream kind, state verifiers."""

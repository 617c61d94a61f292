"""Deciding what to do, apart from doing it: pure functions over plain values, no I/O."""

"""Helpers every room uses: secrets kept out of what is shown, and the one line of an error
that says what went wrong."""

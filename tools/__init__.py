"""Applications built from the library, with their own orchestration: the end-to-end demo."""

"""The Textual terminal app (chat with live expert-cache statistics); not built yet."""

"""One module per checkpoint format; each reads into our parameter tree."""

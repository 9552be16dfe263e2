"""Training encoders (torch, imported lazily: nothing on the query path imports this package)."""

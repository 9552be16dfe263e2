"""`simsearch serve`: the HTTP API and the web page over one db (FastAPI on uvicorn; no torch)."""

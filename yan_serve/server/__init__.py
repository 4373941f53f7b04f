"""The HTTP inference server (FastAPI + uvicorn)."""

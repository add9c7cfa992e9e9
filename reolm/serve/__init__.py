"""After training: item vectors in a FAISS index (``reolm embed items``) and an HTTP service
(``reolm serve``) that recommends from histories of item ids or raw item objects and takes new
items live. Modules: ``model`` (the two towers of a saved Reo-LM), ``index`` (FAISS),
``catalogue`` (the served items and the index folder), ``embed``, ``service`` (the batching
worker), ``app`` (FastAPI + uvicorn), ``config``. See ``docs/serving.md``."""

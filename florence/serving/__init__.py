"""Put a trained model to work: embed image collections, search them with FAISS, serve an HTTP API.

- ``florence.serving.collection``: list the images of folders, globs, CSV files and tar shards.
- ``florence.serving.embed``: the ``Embedder`` (model, transform, tokenizer) and resumable
  Parquet embedding of a collection.
- ``florence.serving.index``: FAISS indexes over those embeddings, exact or approximate.
- ``florence.serving.app``: the FastAPI app and its web page.

Optional packages (pyarrow, faiss-cpu, fastapi, uvicorn, python-multipart) are imported when
first used, and a missing one raises an ImportError that names the pip extra to install.
"""

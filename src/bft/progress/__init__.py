"""Progress of a run: read from its files (``snapshot.py``), shown live on the console
while it runs (``view.py``), reported by ``bft status``; the driver's console kept quiet
with Ray's and vLLM's logs in a log file (``console.py``)."""

"""``bft train``: LoRA fine-tuning on seed pairs with Ray Train (``run.py``), the examples
it learns from (``examples.py``), each worker's loop (``loop.py``) and its record (``record.py``)."""

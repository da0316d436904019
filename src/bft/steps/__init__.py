"""Pipeline steps, one module each: filter, generate, curate, rewrite, sft.

``pipeline.py`` chains them; each LLM step module holds its prompt values and the
parser of its model output, and ``llm.py`` wires any of them to a vLLM processor.
"""

"""Pipeline steps, one module each: filter, generate, curate, rewrite, sft.

``stages.py`` lists them in order and ``graph.py`` chains them; each LLM step module holds
its config section, columns, prompt values and the parser of its model output (the
contract is in ``base.py``), and ``llm.py`` turns rows into requests and replies into kept
rows or drops for every engine layout (``bft/engines/``).
"""

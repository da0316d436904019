"""Execute throughput.ipynb headless (nbclient) with parameters, saving the executed copy.

Parameters replace the values of the notebook's cell tagged ``parameters`` (an injected
cell after it, as papermill does), so the notebook stays runnable by hand.

    python benchmarks/run_notebook.py --docs 16 --scale 10 --results-dir benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
MODEL_SIZES = ("hidden-size", "intermediate-size", "layers", "head-dim", "vocab-size")


def inject(nb: nbformat.NotebookNode, params: dict) -> None:
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Injected by run_notebook.py\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--model")
    p.add_argument("--config")
    p.add_argument("--input")
    p.add_argument("--results-dir", default=str(HERE.parent / "out" / "benchmark" / "results"),
                   help="where throughput.json and the executed throughput.ipynb go")
    p.add_argument("--work", default=str(HERE.parent / "out" / "benchmark" / "work"))
    p.add_argument("--timeout", type=int, default=7200, help="seconds per cell")
    for size in MODEL_SIZES:
        p.add_argument(f"--{size}", type=int, help="random model size (see throughput.py)")
    p.add_argument("--arms", help="comma-separated arms (default: all; see throughput.py)")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="bft config override")
    p.add_argument("--no-run", action="store_true", help="only plot the results already in --results-dir")
    args = p.parse_args(argv)
    model_args = [a for size in MODEL_SIZES if getattr(args, size.replace("-", "_")) is not None
                  for a in (f"--{size}", str(getattr(args, size.replace("-", "_"))))]
    results_dir = Path(args.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    params = {"DOCS": args.docs, "SCALE": args.scale, "MODEL": args.model, "CONFIG": args.config,
              "INPUT": args.input, "MODEL_ARGS": model_args,
              "EXTRA_ARGS": [a for o in args.overrides for a in ("--set", o)] + (["--arms", args.arms] if args.arms else []),
              "RESULTS": str(results_dir / "throughput.json"), "WORK": str(Path(args.work).resolve()), "RUN": not args.no_run}
    nb = nbformat.read(HERE / "throughput.ipynb", as_version=4)
    inject(nb, params)
    NotebookClient(nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    out = results_dir / "throughput.ipynb"
    nbformat.write(nb, out)
    print(f"executed notebook: {out}")
    print(f"results: {params['RESULTS']}")
    return out


if __name__ == "__main__":
    main()

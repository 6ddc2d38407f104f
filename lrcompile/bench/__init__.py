"""Benchmarks: `lrcompile bench`, `lrcompile calibrate`, and the parts the benchmarks/ scripts share.

Owns: a bench run (command: settings, rows, summary; `python -m lrcompile.bench`), the methods it
compares (methods), timing, peak memory, scaling fits, plots, the Markdown report and results
sections, the machine description, and the measuring half of calibration (calibrate). May import
every layer below it (compile, ops, kernels, math). Entry point: `lrcompile.bench.command.run`.
"""

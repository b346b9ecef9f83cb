"""Benchmarks of compress: speed, memory bandwidth, overhead of our machinery, quantization memory scaling.

`make bench` (or `python -m benchmarks.run`) runs them all; `python -m benchmarks.<name>` runs one.
Pure maths lives in benchmarks/maths.py and benchmarks/table.py; everything else measures.
"""

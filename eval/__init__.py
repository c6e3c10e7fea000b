"""Offline tools around the server, kept out of the runtime packages.

- ``fwserve eval`` (eval/cli.py, harness.py, runner.py, report.py, data.py): streams benchmarks
  through a running server and writes the report in docs/eval/;
- ``python -m eval.validate``: chooses rule settings on the training split;
- ``fwserve train-backbone`` (eval/train_backbone.py): trains the bundled backbone.
"""

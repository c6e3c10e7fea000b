"""Offline tools around the server, kept out of the runtime packages.

- ``fwserve eval`` (eval/cli.py): the evaluation report in docs/eval/. benchmarks.py builds the
  streams of a split, simulate.py runs them with the server's rule code on cached features
  (features.py), served.py through a server over HTTP instead, baselines.py the offline
  baselines, stats.py the intervals, protocol.py the methods and their settings, report.py the
  tables and targets, data.py the images and shifts;
- ``python -m eval.validate``: every choice, on the selection split (the pre-registration);
- ``fwserve train-backbone`` (eval/train_backbone.py): trains the bundled backbone.
"""

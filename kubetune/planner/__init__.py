"""The planner: parameters, peak training memory, time and cost of a fine-tuning job before any GPU
burns. Pure arithmetic over a model's ``config.json`` and the method registry; no torch.

* :mod:`~kubetune.planner.architecture`: config.json -> :class:`~kubetune.api.methods.ModelShape`
  (exact parameter counts);
* :mod:`~kubetune.planner.memory`: peak memory per GPU, by part;
* :mod:`~kubetune.planner.compute`: training FLOPs, time and cost on a GPU type;
* :mod:`~kubetune.planner.plan`: all of it for one job and every method, with a recommendation;
* :mod:`~kubetune.planner.job`: a FineTuneJob's facts (model config, GPU, setup, dataset tokens);
* :mod:`~kubetune.planner.cli`: ``kubetune plan``.
"""

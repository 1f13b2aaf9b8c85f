"""kubetune: declarative LLM fine-tuning and adapter serving on Kubernetes.

The package has three halves with one direction of dependency:

* ``kubetune.api``      - the ``kubetune.dev/v1alpha1`` resource types (pydantic) and the CRD generator.
* ``kubetune.worker``   - the training and serving runtime (torch); its ``plan`` module is the
  contract the operator renders and is importable without torch.
* ``kubetune.operator`` - the kopf operator; imports ``kubetune.api`` and the worker's plan
  schema only, never torch.
"""

__version__ = "0.1.0"

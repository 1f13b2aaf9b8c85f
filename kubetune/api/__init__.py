"""The kubetune.dev/v1alpha1 API: typed models and the CRD generator."""

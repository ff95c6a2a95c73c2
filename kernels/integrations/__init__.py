"""Adapters that plug the kernels into other libraries. Each is imported on its own (`import
kernels.integrations.transformers`) and needs its library, an optional extra of this package."""
